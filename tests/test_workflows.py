"""The Dagster pipelines against the real services: the daemon and webserver as processes
on 127.0.0.1 (temporary DAGSTER_HOME), SeaweedFS, the MLflow server and the two-node Ray
cluster. Every step is a Ray job submitted through Dagster Pipes."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from conftest import SMALL_JOB
from mlflow.tracking import MlflowClient

FINAL = ("SUCCESS", "FAILURE", "CANCELED")


def graphql(services):
    from dagster_graphql import DagsterGraphQLClient

    return DagsterGraphQLClient("127.0.0.1", port_number=services.port)


def graphql_post(services, query: str, variables: dict) -> dict:
    """The webserver's answer to one GraphQL request (what the UI sends)."""
    import json
    import urllib.request

    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(f"{services.url}/graphql", body,
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert "errors" not in answer, answer
    return answer["data"]


def wait_run(services, run_id: str, timeout: float = 600) -> str:
    client = graphql(services)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id).value
        if status in FINAL:
            return status
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} not finished within {timeout}s")


def step_events(run_id: str):
    """(step key, event type) of every step event of a run, in order."""
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        records = instance.all_logs(run_id)
    return [(r.step_key, r.dagster_event.event_type_value) for r in records
            if r.dagster_event and r.step_key]  # fmt: skip


def messages(run_id: str) -> str:
    """The log messages of a run's steps (context.log), one a line."""
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        return "\n".join(r.user_message for r in instance.all_logs(run_id) if r.step_key)


def failures(run_id: str) -> str:
    """The step failures of a run, as Dagster recorded them."""
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        records = instance.all_logs(run_id)
    return "\n".join(r.dagster_event.step_failure_data.error.to_string()[-3000:]
                     for r in records if r.dagster_event
                     and r.dagster_event.event_type_value == "STEP_FAILURE")  # fmt: skip


def outputs(run_id: str) -> dict:
    """Each step's output metadata of a run."""
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        records = instance.all_logs(run_id)
    found = {}
    for r in records:
        event = r.dagster_event
        if event and event.event_type_value == "STEP_OUTPUT":
            found[r.step_key] = {k: v.value for k, v in event.step_output_data.metadata.items()}
    return found


def small_run_config(tag: str, out: str) -> dict:
    train = [*SMALL_JOB, f"storage=s3://vit/runs-wf-{tag}", "checkpoint.every_steps=4"]
    return {"ops": {
        "make_shards": {"config": {"source": "digits", "out": out}},
        "pretrain": {"config": {"overrides": [
            *train, "train.steps=4", f"tracking.experiment=wf-pre-{tag}",
            f"tracking.registered_model=wf-backbone-{tag}", "tracking.alias=backbone"]}},
        "finetune": {"config": {"overrides": [
            *train, "train.steps=24", "optim.ema_decay=0", "optim.warmup_steps=2",
            f"tracking.experiment=wf-ft-{tag}", f"tracking.registered_model=wf-digits-{tag}"]}},
    }}  # fmt: skip


def secrets_in(root, secrets: list[str]) -> list[str]:
    """The files under `root` holding any of `secrets` (as bytes: SQLite files included)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path}: {secret[:4]}..." for secret in secrets if secret.encode() in data]
    return found


def ray_jobs(prefix: str) -> dict[str, str]:
    """Submission id -> status of the Ray jobs whose id starts with `prefix`."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient()
    return {j.submission_id: str(j.status) for j in client.list_jobs()
            if j.submission_id and j.submission_id.startswith(prefix)}  # fmt: skip


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"{what} not within {timeout}s")


def runs_of(**tags) -> list:
    """The runs in the session's Dagster instance carrying these tags, newest first."""
    from dagster import DagsterInstance, RunsFilter

    with DagsterInstance.get() as instance:
        return list(instance.get_runs(RunsFilter(tags=tags)))


@pytest.mark.slow
def test_full_pipeline_through_the_daemon_resumes_a_stopped_step_without_resubmitting(
    dagster_services, mlflow_server, s3, ray_cluster
):
    """full_pipeline submitted to the daemon, every step a Ray job; one run for two claims
    (each Ray job costs most of a minute here):
    1. The fine-tune step's Ray job is stopped mid-way, so the run fails; `cli.py resume`
    re-executes it from the failed step (finished steps are not run again): the fine-tune is
    a new attempt (`-2`) under the same run name and resumes from its newest checkpoint.
    The stopped job's MLflow run is continued by attempt -2, each step logged once (what a
    stopped `finetune.py` job submitted again under its run name does).
    2. That resume runs the pipeline in its own process, which is killed while attempt -2
    is RUNNING; `cli.py resume --mark-failed` then awaits that same Ray job: no attempt -3.
    The pipeline then ends as a whole run does: fine-tuned from the exact backbone version
    the pretraining step registered, evaluated, promoted, and no secret recorded."""
    import os
    import signal
    import subprocess
    import sys

    from jobs import ROOT
    from ray.job_submission import JobSubmissionClient

    from vit_core.train.checkpoint import latest_stored_checkpoint

    tag = uuid.uuid4().hex[:6]
    out = f"s3://vit/datasets/wf-{tag}/v1"
    run_id = graphql(dagster_services).submit_job_execution(
        "full_pipeline", run_config=small_run_config(tag, out))
    base = f"dagster-{run_id}-finetune"
    wait_for(lambda: ray_jobs(base).get(base) == "RUNNING", 600, "the fine-tune job")
    location = f"s3://vit/runs-wf-{tag}/finetune-{run_id[:13]}"
    wait_for(lambda: (latest_stored_checkpoint(location) or None) and
             latest_stored_checkpoint(location).step >= 4, 300, "a checkpoint")  # fmt: skip
    JobSubmissionClient().stop_job(base)
    assert wait_run(dagster_services, run_id) == "FAILURE"
    stopped_at = latest_stored_checkpoint(location).step
    # The stopped job marked its MLflow run KILLED on its way out (Ray's stop is a SIGTERM).
    client = MlflowClient(mlflow_server.uri)
    (stopped,) = client.search_runs([client.get_experiment_by_name(f"wf-ft-{tag}").experiment_id])
    assert stopped.info.status == "KILLED", stopped.info

    cli = [sys.executable, "pipelines/workflows/cli.py"]
    # The orchestrator: this resume executes the run in its own process (and its step
    # processes), all in one process group, killed at once as a crash would.
    orchestrator = subprocess.Popen([*cli, "resume", run_id], cwd=ROOT, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: ray_jobs(base).get(f"{base}-2") == "RUNNING", 300, "attempt -2")
    finally:
        os.killpg(orchestrator.pid, signal.SIGKILL)
        orchestrator.wait()
    (killed,) = runs_of(**{"dagster/parent_run_id": run_id})
    assert killed.status.value == "STARTED"  # nobody told Dagster

    resumed = subprocess.run([*cli, "resume", killed.run_id, "--mark-failed"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (new_run,) = re.findall(r"^run (\S+) \(re-execution of", resumed.stdout, re.MULTILINE)
    started = [step for step, kind in step_events(new_run) if kind == "STEP_START"]
    assert started == ["finetune", "evaluate", "promote"]  # not make_shards nor pretrain
    # Submitted twice in all: the stopped job and attempt -2, awaited after the kill.
    assert ray_jobs(base) == {base: "STOPPED", f"{base}-2": "SUCCEEDED"}
    assert f"Ray job {base}-2 of this run is" in messages(new_run)  # attached, not submitted
    log = JobSubmissionClient().get_job_logs(f"{base}-2")
    announced = re.search(rf"resuming run finetune-{run_id[:13]} from step (\d+) ", log)
    assert announced and int(announced.group(1)) >= stopped_at >= 4, log[-3000:]
    # The stopped job's MLflow run was continued by attempt -2: each step logged once.
    (run,) = client.search_runs([client.get_experiment_by_name(f"wf-ft-{tag}").experiment_id])
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [int(announced.group(1))]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(2, 25, 2))
    assert run.info.status == "FINISHED"
    status = subprocess.run([*cli, "status", new_run], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert "SUCCESS" in status.stdout and "finetune: SUCCESS" in status.stdout
    assert f"re-execution of {killed.run_id}" in status.stdout

    # The whole pipeline: the first run's finished steps, then the re-execution's.
    done = {**outputs(run_id), **outputs(new_run)}
    assert list(done) == ["make_shards", "pretrain", "finetune", "evaluate", "promote"]
    # The fine-tune started from the exact version the pretraining step registered.
    (version,) = client.search_model_versions(f"name='wf-digits-{tag}'")
    assert version.tags["base_model"] == f"wf-backbone-{tag}"
    assert version.tags["base_model_version"] == "1"
    assert done["finetune"]["model_uri"] == f"models:/wf-digits-{tag}/1"
    # The training runs are named after the first Dagster run, so a re-execution resumes them.
    assert done["finetune"]["run_name"] == f"finetune-{run_id[:13]}"
    assert done["evaluate"]["eval_count"] == 359
    # The first model for a name is promoted.
    assert done["promote"]["promoted"] is True
    assert client.get_model_version_by_alias(f"wf-digits-{tag}", "champion").version == "1"
    # No secret in what Dagster recorded (run config, event log, compute logs: all the UI
    # shows is in the instance directory) nor in the steps' Ray jobs' runtime environments.
    secrets = [s3.access_key, s3.secret_key, ray_cluster.auth_token]
    assert secrets_in(dagster_services.home, secrets) == []
    jobs = [j for j in JobSubmissionClient().list_jobs()
            if (j.submission_id or "").startswith(f"dagster-{run_id}-")]  # fmt: skip
    assert len(jobs) == 6  # make_shards, pretrain, finetune twice, evaluate, promote
    assert not [j.submission_id for j in jobs if any(s in repr(j) for s in secrets)]


@pytest.mark.slow
def test_sensor_starts_one_run_per_new_dataset_version(dagster_services, s3):
    """A new <prefix>/<name>/index.json starts exactly one finetune_pipeline run (run key:
    the dataset's version); further ticks with nothing new start none."""
    import yaml
    from dagster import DagsterInstance, RunsFilter

    from vit_core.data import make_digits_shards, read_index

    prefix = f"s3://vit/datasets/sensed-{uuid.uuid4().hex[:6]}"
    # The runs it starts stop in their first step, at the config check (a misspelt key),
    # so no Ray job is submitted: the runs, not their work, are what is counted here.
    dagster_services.settings.write_text(yaml.safe_dump({
        "sensor": {"watch": prefix, "interval_seconds": 5, "running": True},
        "finetune": {"run_config": {"ops": {"finetune_from_champion": {
            "config": {"overrides": ["train.no_such_key=1"]}}}}},
    }))  # fmt: skip
    client = graphql(dagster_services)
    client.reload_repository_location("vit")  # the sensor's running state is read on load

    def runs():
        with DagsterInstance.get() as instance:
            return instance.get_runs(RunsFilter(job_name="finetune_pipeline",
                                                tags={"vit/dataset": f"{prefix}/v1"}))  # fmt: skip

    time.sleep(12)  # ticks over an empty prefix: nothing to run
    assert runs() == []
    make_digits_shards(f"{prefix}/v1", image_size=8, progress=False)
    (run,) = wait_for(runs, 120, "the sensor's run")
    assert run.tags["dagster/run_key"] == read_index(f"{prefix}/v1").version
    assert wait_run(dagster_services, run.run_id) == "FAILURE"
    assert "unknown config key train.no_such_key" in failures(run.run_id)
    time.sleep(15)  # three more ticks, nothing new
    assert len(runs()) == 1
    dagster_services.settings.write_text("{}\n")
    client.reload_repository_location("vit")


SCHEDULE_STATE = """
mutation($selector: ScheduleSelector!) {
  startSchedule(scheduleSelector: $selector) {
    __typename
    ... on ScheduleStateResult { scheduleState { id status } }
    ... on PythonError { message }
  }
}"""
STOP_SCHEDULE = """
mutation($id: String!) {
  stopRunningSchedule(id: $id) {
    __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on PythonError { message }
  }
}"""


@pytest.mark.slow
def test_schedule_every_minute_queues_behind_the_running_run(
    dagster_services, digits_s3, pretrained_backbone
):
    """finetune_schedule, due every minute (cron and time zone from the settings file),
    switched on as the UI's toggle does: while a finetune_pipeline run is in progress, the
    run its tick starts waits in the daemon's queue (one run per pipeline: tag concurrency
    limit 1) and starts only after the first one has ended."""
    import yaml
    from ray.job_submission import JobSubmissionClient

    # The scheduled runs stop at the config check (a misspelt key): no Ray job, seconds.
    dagster_services.settings.write_text(yaml.safe_dump({"finetune": {
        "cron": "* * * * *", "timezone": "Asia/Kolkata", "running": False,
        "run_config": {"ops": {
            "dataset_version": {"config": {"location": digits_s3}},
            "finetune_from_champion": {"config": {"overrides": ["train.no_such_key=1"]}}}},
    }}))  # fmt: skip
    client = graphql(dagster_services)
    client.reload_repository_location("vit")  # cron and time zone are read on load
    # The run in progress: a long fine-tune on one worker, stopped by this test.
    first = client.submit_job_execution("finetune_pipeline", run_config={"ops": {
        "dataset_version": {"config": {"location": digits_s3}},
        "finetune_from_champion": {"config": {
            "base": f"models:/{pretrained_backbone}@backbone", "overrides": [
                *SMALL_JOB, "scaling.num_workers=1", "scaling.placement_strategy=PACK",
                "train.steps=5000", "checkpoint.every_steps=5000", "tracking.register=false",
                f"storage=s3://vit/runs-wfs-{uuid.uuid4().hex[:6]}"]}},
    }})  # fmt: skip
    started = graphql_post(dagster_services, SCHEDULE_STATE, {"selector": {
        "repositoryLocationName": "vit", "repositoryName": "__repository__",
        "scheduleName": "finetune_schedule"}})["startSchedule"]  # fmt: skip
    assert started["__typename"] == "ScheduleStateResult", started
    try:
        (scheduled,) = wait_for(lambda: runs_of(**{"dagster/schedule_name": "finetune_schedule"}),
                                150, "the schedule's run")  # fmt: skip
    finally:
        stopped = graphql_post(dagster_services, STOP_SCHEDULE, {"id": started["scheduleState"]["id"]})
        assert stopped["stopRunningSchedule"]["__typename"] == "ScheduleStateResult", stopped
    assert scheduled.tags[".dagster/scheduled_execution_time"].endswith(":00+00:00")  # whole minute
    time.sleep(12)  # two more passes of the run queue
    (scheduled,) = runs_of(**{"dagster/schedule_name": "finetune_schedule"})
    assert client.get_run_status(first).value in ("STARTING", "STARTED")
    assert scheduled.status.value == "QUEUED"

    base = f"dagster-{first}-finetune_from_champion"
    wait_for(lambda: ray_jobs(base).get(base) == "RUNNING", 300, "the first run's Ray job")
    JobSubmissionClient().stop_job(base)
    assert wait_run(dagster_services, first) == "FAILURE"
    assert wait_run(dagster_services, scheduled.run_id, 120) == "FAILURE"
    assert "unknown config key train.no_such_key" in failures(scheduled.run_id)
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        ended = instance.get_run_record_by_id(first).end_time
        began = instance.get_run_record_by_id(scheduled.run_id).start_time
    assert began >= ended  # dequeued only once the first run had ended
    dagster_services.settings.write_text("{}\n")
    client.reload_repository_location("vit")


def step_failure(result) -> str:
    """The step failures of an in-process run (execute_in_process), as the UI shows them."""
    return "\n".join(f"{e.step_failure_data.user_failure_data.description}"
                     if e.step_failure_data.user_failure_data else e.step_failure_data.error.to_string()
                     for e in result.all_events if e.is_step_failure)  # fmt: skip


def test_a_time_limit_that_is_not_positive_stops_the_run_in_its_first_step(tmp_path):
    """Checked with every step's parameters before any job runs: one line, step and key."""
    from pipelines.workflows.definitions import full_pipeline

    out = tmp_path / "never"
    result = full_pipeline.execute_in_process(raise_on_error=False, run_config={"ops": {
        "make_shards": {"config": {"out": str(out)}},
        "promote": {"config": {"timeout_s": 0}},
    }})  # fmt: skip
    assert not result.success
    assert step_failure(result) == (
        "run config ops.promote.config: timeout_s: Input should be greater than 0")
    assert not out.exists()


def test_a_local_job_past_its_time_limit_is_stopped(tmp_path, monkeypatch):
    """The embedded default (no RAY_ADDRESS): the step's job is a local process, stopped
    at its limit; the step fails naming step, job and limit."""
    from pipelines.workflows.definitions import full_pipeline

    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "digits"
    started = time.monotonic()
    result = full_pipeline.execute_in_process(raise_on_error=False, op_selection=["make_shards"],
        run_config={"ops": {"make_shards": {"config": {"out": str(out), "timeout_s": 1}}}})  # fmt: skip
    assert not result.success
    assert step_failure(result) == ("step make_shards: job make_shards.py ran past its time "
                                    "limit (timeout_s: 1 s) and was stopped")  # fmt: skip
    assert time.monotonic() - started < 60
    assert not (out / "index.json").exists()


def test_a_ray_job_past_its_time_limit_is_stopped(ray_cluster, s3):
    """On a cluster (RAY_ADDRESS): the step's Ray job is stopped at its limit (stop_job)
    and the step fails with one line naming step, submission id and limit."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.workflows.definitions import full_pipeline
    from vit_core import storage

    out = f"s3://vit/datasets/limit-{uuid.uuid4().hex[:6]}/v1"
    result = full_pipeline.execute_in_process(raise_on_error=False, op_selection=["make_shards"],
        run_config={"ops": {"make_shards": {"config": {"out": out, "timeout_s": 2}}}})  # fmt: skip
    submission_id = f"dagster-{result.run_id}-make_shards"
    assert step_failure(result) == (f"step make_shards: Ray job {submission_id} ran past its "
                                    "time limit (timeout_s: 2 s) and was stopped")  # fmt: skip
    assert str(JobSubmissionClient().get_job_status(submission_id)) == "STOPPED"
    assert not storage.exists(storage.join(out, "index.json"))
