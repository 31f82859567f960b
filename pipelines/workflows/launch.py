"""Where a step's job runs, chosen by the environment:

- RAY_ADDRESS (or RAY_API_SERVER_ADDRESS) set: a Ray job on that cluster
  (ray_jobs.RayJobPipesClient: deterministic submission ids, attach instead of submitting
  twice, logs read back from the cluster);
- neither set, the embedded default (`make demo`): the same `python pipelines/<job>.py ...`
  command line as a local process, through Dagster's own PipesSubprocessClient; the job
  starts its local Ray as it does when run by hand, or joins the local Ray whose address
  is in VIT_LOCAL_RAY_ADDRESS (the demo starts one for its whole run: starting and
  stopping a Ray per job costs tens of seconds on a small machine).

Both hand the job's result back the same way (Dagster Pipes: `vit_core.cli.report_result`
in the job), so a step, a hand-submitted Ray job and a command typed in a shell are one
code path.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import dagster as dg

from pipelines.workflows.ray_jobs import JobResult, RayJobPipesClient

ROOT = Path(__file__).resolve().parents[2]
# A local Ray the embedded default's jobs join (its GCS address), instead of each
# starting its own; not a cluster to submit Ray jobs to.
LOCAL_RAY = "VIT_LOCAL_RAY_ADDRESS"
# Dagster's own Pipes session calls one of its preview functions at every step and warns
# about it; nothing here uses it.
warnings.filterwarnings("ignore", category=dg.PreviewWarning,
                        message=".*expected_writer_count")  # fmt: skip

def on_ray_cluster() -> bool:
    """Whether steps submit Ray jobs (a cluster is named) or run local processes."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS"))


def run_job(context: dg.OpExecutionContext, script: str, args: list[str],
            timeout_s: float | None = None) -> JobResult:  # fmt: skip
    """Run `pipelines/<script> <args>` for this step (a Ray job or a local process, see
    the module's doc) and return its JobResult. Raises dagster.Failure when the job fails,
    or runs past `timeout_s` seconds (it is stopped; one line names step, job and limit)."""
    if on_ray_cluster():
        return RayJobPipesClient().run(context=context, script=script, args=args, timeout_s=timeout_s)
    return run_local(context, script, args, timeout_s)


def run_local(context: dg.OpExecutionContext, script: str, args: list[str],
              timeout_s: float | None) -> JobResult:  # fmt: skip
    """The job as a process in this working directory (relative paths, ./mlflow.db and the
    embedded dataset mean what they mean by hand), its output on this process's stdout
    (the step's compute log). A time limit goes through coreutils' `timeout`, which
    interrupts the job's whole process group (the job and the local Ray it started)."""
    command = [sys.executable, str(ROOT / "pipelines" / script), *args]
    if timeout_s is not None:
        command = ["timeout", "--signal=INT", "--kill-after=30", f"{timeout_s:g}", *command]
    context.log.info(f"running {' '.join(command)}")
    start = time.monotonic()
    try:
        shared = {"RAY_ADDRESS": os.environ[LOCAL_RAY]} if os.environ.get(LOCAL_RAY) else {}
        invocation = dg.PipesSubprocessClient(env=shared).run(context=context, command=command)
    except Exception:  # the process's failure (its output is the step's stdout)
        if timeout_s is not None and time.monotonic() - start >= timeout_s:
            raise dg.Failure(description=f"step {context.op_handle.name}: job {script} ran past "
                             f"its time limit (timeout_s: {timeout_s:g} s) and was stopped") from None  # fmt: skip
        raise
    seconds = time.monotonic() - start
    record = {}
    for message in invocation.get_custom_messages():
        if isinstance(message, dict):
            record.update(message)
    if not record:
        raise dg.Failure(description=f"step {context.op_handle.name}: job {script} ended "
                         "without reporting a result through Dagster Pipes")  # fmt: skip
    context.add_output_metadata({"job_seconds": round(seconds, 2), "launcher": "local process"})
    return JobResult(f"local:{script}", "SUCCEEDED", False, record, seconds)
