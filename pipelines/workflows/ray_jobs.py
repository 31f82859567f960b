"""A Dagster Pipes client that runs one of the job scripts (`pipelines/<job>.py`) as a Ray
job through Ray's JobSubmissionClient, the same submission a user makes with
`ray job submit --working-dir . -- python pipelines/<job>.py ...`.

The job reports its result through Dagster Pipes (`vit_core.cli.report_result`): Pipes
messages are JSON lines on the job's stdout, which Ray keeps as the job's log, so the
step reads them back from the cluster with `get_job_logs`, wherever the cluster and the
orchestrator run, with no shared file system or extra bucket. The job's other log lines
go to the step's stdout, which Dagster captures as the step's compute log (the UI's
stdout tab).

Submission ids are deterministic: `dagster-<root run id>-<step key>`, with `-2`, `-3`, ...
for later attempts. A step started again for the same run (a re-execution, or an
orchestrator that died and came back) first looks for its jobs on the cluster:

- the newest attempt RUNNING or PENDING: attach to it and wait (never submit twice);
- SUCCEEDED: reuse it (its result is read from its log again);
- FAILED or STOPPED (or none yet): submit the next attempt.

A step's time limit (`timeout_s`) counts from the job's submission (Ray's start_time): past
it, the job is stopped (`stop_job`) and the step fails with one line naming the step, the
submission id and the limit.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster import PipesEnvContextInjector, PipesMessageReader, open_pipes_session
from dagster_pipes import PIPES_PROTOCOL_VERSION_FIELD, PipesDefaultMessageWriter

ROOT = Path(__file__).resolve().parents[2]
ACTIVE = ("PENDING", "RUNNING")
# What the job's working directory upload leaves out (as tests/jobs.py does): local
# datasets, runs, databases, environments and the stack's and Dagster's state.
EXCLUDES = ["data/", "runs/", "*.db", ".venv/", ".stack/", ".dagster/", "mlruns/", ".git/"]


class RayJobLogReader(PipesMessageReader):
    """Reads Pipes messages out of a Ray job's log. `pump` is called by the client while
    it waits: each call fetches the log, hands new Pipes messages to Dagster and forwards
    the other new lines to stdout (the step's compute log)."""

    def __init__(self) -> None:
        self._handler = None
        self._seen = 0  # characters of the log already handled

    @contextmanager
    def read_messages(self, handler) -> Iterator[dict]:
        self._handler = handler
        # Tells the job's PipesDefaultMessageWriter to write to its stdout.
        yield {PipesDefaultMessageWriter.STDIO_KEY: PipesDefaultMessageWriter.STDOUT}

    def pump(self, client, submission_id: str) -> None:
        import json

        text = client.get_job_logs(submission_id)
        new, self._seen = text[self._seen:], len(text)
        for line in new.splitlines():
            stripped = line.strip()
            if stripped.startswith("{") and PIPES_PROTOCOL_VERSION_FIELD in stripped:
                try:
                    message = json.loads(stripped)
                except json.JSONDecodeError:
                    message = None
                if isinstance(message, dict) and PIPES_PROTOCOL_VERSION_FIELD in message:
                    self._handler.handle_message(message)
                    continue
            print(line, flush=False)
        sys.stdout.flush()

    def no_messages_debug_text(self) -> str:
        return "Pipes messages are read from the Ray job's log (get_job_logs)."


@dataclass
class JobResult:
    """What a step's job hands back: its id (the Ray submission id, or the local process
    id), final status, reported record and its own wall time."""

    job_id: str
    status: str
    reused: bool  # an earlier job of this run and step was attached to or reused
    record: dict
    seconds: float  # the job's own time: Ray's start to end times, or the process's life


def submission_base(context: dg.OpExecutionContext) -> str:
    """`dagster-<root run id>-<step key>`: the same for every re-execution of a run."""
    root = context.run.root_run_id or context.run_id
    return f"dagster-{root}-{context.op_handle.name}"


def attempts(client, base: str) -> list:
    """This run's and step's jobs on the cluster, oldest attempt first."""
    def number(submission_id: str) -> int:
        tail = submission_id[len(base):]
        return int(tail[1:]) if tail else 1

    found = [
        job for job in client.list_jobs()
        if job.submission_id and (job.submission_id == base or (
            job.submission_id.startswith(base + "-") and job.submission_id[len(base) + 1:].isdigit()))
    ]  # fmt: skip
    return sorted(found, key=lambda job: number(job.submission_id))


def job_client():
    """A JobSubmissionClient for the cluster at RAY_API_SERVER_ADDRESS or RAY_ADDRESS (Ray's
    own resolution; a `ray://` or GCS address is mapped to the dashboard by Ray)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(os.environ.get("RAY_API_SERVER_ADDRESS") or None)


class RayJobPipesClient(dg.PipesClient):
    """Runs `pipelines/<script>` as a Ray job for a Dagster step, through Pipes.

    `run` returns a JobResult; it raises dagster.Failure (with the job's last log lines)
    when the job ends FAILED or STOPPED, or runs past `timeout_s` seconds (then it is
    stopped first)."""

    def __init__(self, poll_seconds: float = 2.0) -> None:
        self.poll_seconds = poll_seconds

    def run(  # type: ignore[override]
        self, *, context: dg.OpExecutionContext, script: str, args: list[str],
        entrypoint_num_cpus: float = 0, timeout_s: float | None = None,
    ) -> JobResult:  # fmt: skip
        client = job_client()
        base = submission_base(context)
        reader = RayJobLogReader()
        with open_pipes_session(
            context=context, context_injector=PipesEnvContextInjector(), message_reader=reader
        ) as session:
            previous = attempts(client, base)
            last = previous[-1] if previous else None
            status = str(last.status) if last else None
            if last is not None and (status in ACTIVE or status == "SUCCEEDED"):
                submission_id, reused = last.submission_id, True
                context.log.info(f"Ray job {submission_id} of this run is {status}: "
                                 "attaching to it instead of submitting again")  # fmt: skip
            else:
                submission_id = base if not previous else f"{base}-{len(previous) + 1}"
                entrypoint = " ".join(["python", f"pipelines/{script}", *map(_quote, args)])
                reused = self._submit(client, context, submission_id, entrypoint, dict(
                    entrypoint_num_cpus=entrypoint_num_cpus,
                    runtime_env={
                        "working_dir": str(ROOT),
                        "excludes": EXCLUDES,
                        # Only the Pipes bootstrap (the step's context: run id, step, where
                        # to write messages); the cluster has its own credentials.
                        "env_vars": session.get_bootstrap_env_vars(),
                    },
                    metadata={"dagster_run_id": context.run_id,
                              "dagster_step": context.op_handle.name},
                ))  # fmt: skip
            status = self._wait(client, submission_id, reader, timeout_s, context.op_handle.name)
        record = {}
        for message in session.get_custom_messages():
            if isinstance(message, dict):
                record.update(message)
        if status != "SUCCEEDED":
            info = client.get_job_info(submission_id)
            tail = "\n".join(client.get_job_logs(submission_id).splitlines()[-30:])
            raise dg.Failure(
                description=f"Ray job {submission_id} ({script}) ended {status}: {info.message}",
                metadata={"ray_submission_id": submission_id, "log_tail": dg.MetadataValue.text(tail)},
            )  # fmt: skip
        if not record:
            raise dg.Failure(description=f"Ray job {submission_id} ({script}) succeeded but "
                             "reported no result through Dagster Pipes")  # fmt: skip
        info = client.get_job_info(submission_id)
        seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else 0.0
        context.add_output_metadata({"ray_submission_id": submission_id, "reused_job": reused,
                                     "job_seconds": round(seconds, 2)})  # fmt: skip
        return JobResult(submission_id, status, reused, record, seconds)

    def _submit(self, client, context, submission_id: str, entrypoint: str, options: dict,
                patience: float = 120) -> bool:  # fmt: skip
        """Submit under `submission_id`; True when a job of that id was already there (then
        it is attached to). Ray answers "No available agent" while a node's agent is still
        starting: that is waited out for up to `patience` seconds."""
        deadline = time.monotonic() + patience
        while True:
            try:
                client.submit_job(entrypoint=entrypoint, submission_id=submission_id, **options)
                context.log.info(f"submitted Ray job {submission_id}: {entrypoint}")
                return False
            except RuntimeError as err:
                if "already exists" in str(err):  # submitted by another try of this step
                    context.log.info(f"Ray job {submission_id} already submitted: attaching")
                    return True
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(3)

    def _wait(self, client, submission_id: str, reader: RayJobLogReader,
              timeout_s: float | None, step: str) -> str:  # fmt: skip
        """The job's final status, its log pumped meanwhile; past `timeout_s` (counted from
        the job's submission, also for a job attached to) it is stopped and the step fails."""
        started = client.get_job_info(submission_id).start_time / 1000  # ms since the epoch
        while True:
            status = str(client.get_job_status(submission_id))
            reader.pump(client, submission_id)
            if status not in ACTIVE:
                return status
            if timeout_s is not None and time.time() - started > timeout_s:
                client.stop_job(submission_id)
                while str(client.get_job_status(submission_id)) in ACTIVE:
                    time.sleep(1)
                raise dg.Failure(description=f"step {step}: Ray job {submission_id} ran past "
                                 f"its time limit (timeout_s: {timeout_s:g} s) and was stopped")  # fmt: skip
            time.sleep(self.poll_seconds)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
