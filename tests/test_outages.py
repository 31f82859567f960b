"""Service outages in the middle of one training job on the two-node cluster: the MLflow
server stopped for 60 s, then SeaweedFS for 30 s, as an operator would see them. The run
finishes without a worker-group restart, every step's metrics reach MLflow once, steps
keep their pace while MLflow is away, no sample is counted bad for the storage outage
and no incomplete checkpoint is left behind.

The session's own servers are stopped and started again on their ports and data
(tests run one at a time, so nothing else uses them meanwhile)."""

from __future__ import annotations

import statistics
import time
import uuid
from collections import defaultdict

import pytest
from conftest import SMALL_JOB
from jobs import SubmittedJob, sets
from mlflow.tracking import MlflowClient

from vit_core import storage
from vit_core.train.checkpoint import CHECKPOINT_FILES, latest_stored_checkpoint

STEPS = 300
MLFLOW_DOWN_S = 60
S3_DOWN_S = 30


def outage(service, seconds: float) -> tuple[float, float]:
    """Stop `service`, wait `seconds`, start it again on its ports and data; returns the
    wall-clock (time.time) span during which it did not answer."""
    began = time.time()
    service.stop()
    try:
        time.sleep(seconds)
    finally:
        service.start()
    return began, time.time()


@pytest.mark.slow
def test_training_rides_out_tracking_and_storage_outages(
    ray_cluster, mlflow_server, s3, digits_s3
):
    tag = uuid.uuid4().hex[:6]
    run_name, root = f"outage-{tag}", f"s3://vit/runs-outage-{tag}"
    location = storage.join(root, run_name)
    job = SubmittedJob(ray_cluster, "pretrain.py", sets(
        *SMALL_JOB, f"run_name={run_name}", f"storage={root}", f"data.location={digits_s3}",
        f"train.steps={STEPS}", "train.log_every_steps=1", "checkpoint.every_steps=5",
        f"tracking.experiment=outage-{tag}", "tracking.register=false",
    ))  # fmt: skip
    deadline = time.monotonic() + 240
    while latest_stored_checkpoint(location) is None:
        assert job.status() in ("PENDING", "RUNNING"), job.logs()[-3000:]
        assert time.monotonic() < deadline, job.logs()[-3000:]
        time.sleep(1)
    time.sleep(5)  # steps before the outage, to compare with
    mlflow_down = outage(mlflow_server, MLFLOW_DOWN_S)
    assert job.status() == "RUNNING", "the outages must fall inside the run: raise STEPS"
    s3_down = outage(s3, S3_DOWN_S)
    assert job.status() == "RUNNING", "the outages must fall inside the run: raise STEPS"
    status = job.wait(timeout=300)
    logs = job.logs()
    assert status == "SUCCEEDED", logs[-4000:]
    print(f"MLflow down {mlflow_down[1] - mlflow_down[0]:.0f} s, "
          f"SeaweedFS down {s3_down[1] - s3_down[0]:.0f} s")  # fmt: skip

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(f"outage-{tag}").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # No worker-group restart: nothing resumed, and the job had one group of two workers.
    assert client.get_metric_history(run_id, "resumed_from_step") == []
    assert "resumed from" not in logs
    assert len(job_train_workers(ray_cluster, job.job_id)) == 2
    # Every step's metrics arrived once, in spite of the tracking outage.
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    # Steps kept their pace while MLflow was away (timestamps are taken at the step).
    stamps = {m.step: m.timestamp / 1000 for m in history}
    durations = {s: stamps[s] - stamps[s - 1] for s in stamps if s - 1 in stamps}
    before = [d for s, d in durations.items() if stamps[s] < mlflow_down[0]][-40:]
    during = [d for s, d in durations.items() if mlflow_down[0] <= stamps[s] <= mlflow_down[1]]
    pace = statistics.median(during) / statistics.median(before)
    print(f"median step before the tracking outage {statistics.median(before):.3f} s "
          f"({len(before)} steps), during it {statistics.median(during):.3f} s "
          f"({len(during)} steps): ratio {pace:.2f}")  # fmt: skip
    assert len(during) >= 20 and pace < 2.0, (before, during)
    # The storage outage held up a checkpoint upload and cost no sample.
    checkpoint_steps = [s for s in stamps if s % 5 == 0 and s3_down[0] <= stamps[s] <= s3_down[1]]
    assert checkpoint_steps, "no checkpoint was taken during the storage outage"
    bad = client.get_metric_history(run_id, "bad_samples")
    assert bad and all(m.value == 0 for m in bad), bad
    assert "storage unreachable" in logs  # a reader or uploader waited, and said so
    # Every checkpoint left on storage is complete.
    files = defaultdict(set)
    for uri in storage.list_files(location):
        name, _, rest = uri[len(location) + 1 :].partition("/")
        if name.startswith("checkpoint_"):
            files[name].add(rest)
    assert files and all(CHECKPOINT_FILES <= found for found in files.values()), files
    assert latest_stored_checkpoint(location).step == STEPS


def job_train_workers(ray_cluster, submission_id: str) -> list:
    """The Ray Train worker actors a submitted job ever had."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(ray_cluster.dashboard_url).get_job_info(submission_id).job_id
    workers = list_actors(
        address=ray_cluster.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        raise_on_missing_output=False,
    )
    return [w for w in workers if w.job_id == job_id]
