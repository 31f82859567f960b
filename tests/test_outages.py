"""Service outages in the middle of one training job on the two-node cluster: the MLflow
server stopped for 60 s, and SeaweedFS for 30 s within that, as an operator would see
them. The run finishes without a worker-group restart, every step's metrics reach MLflow
once, steps keep their pace while MLflow is away, a checkpoint upload and a shard read
wait for the store, no sample is counted bad, and no incomplete checkpoint is left.

The outages follow the job's own progress (its checkpoints on storage), not the clock, so
a slow or loaded machine shifts them along with the job. The session's own servers are
stopped and started again on their ports and data (tests run one at a time, so nothing
else uses them meanwhile)."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from concurrent.futures import Future

import pytest
from conftest import SMALL_JOB
from jobs import FINAL, SubmittedJob, newest_step, sets, train_workers
from mlflow.tracking import MlflowClient

from vit_core import storage
from vit_core.data import DataConfig, build_dataset, open_dataset
from vit_core.train.checkpoint import CHECKPOINT_FILES, checkpoint_files, latest_stored_checkpoint

STEPS = 150
MLFLOW_DOWN_S = 60
S3_DOWN_S = 30
CHECKPOINT_EVERY = 5
# Global batch 32 on the 1438 training digits: 44 steps an epoch.
EPOCH_STEPS = 44
# Steps before the tracking outage, and during it with storage up, to compare paces.
PACE_STEPS = 20


@pytest.mark.slow
def test_training_rides_out_tracking_and_storage_outages(
    ray_cluster, ray_client, mlflow_server, s3, digits_s3
):
    """MLflow goes down once the job has PACE_STEPS steps; SeaweedFS goes down for 30 s
    just after a checkpoint early in an epoch, some PACE_STEPS steps later; MLflow comes
    back 60 s after it went down (its start adds some seconds). Overlapping them keeps the
    job short; step times are compared over the part of the tracking outage that storage
    was up."""
    submitted = time.time()
    tag = uuid.uuid4().hex[:6]
    run_name, root = f"outage-{tag}", f"s3://vit/runs-outage-{tag}"
    location = storage.join(root, run_name)
    job = SubmittedJob(ray_cluster, "pretrain.py", sets(
        *SMALL_JOB, f"run_name={run_name}", f"storage={root}", f"data.location={digits_s3}",
        f"train.steps={STEPS}", "train.log_every_steps=1",
        f"checkpoint.every_steps={CHECKPOINT_EVERY}",
        "train.global_batch_size=32", "train.micro_batch_size=16",
        f"tracking.experiment=outage-{tag}", "tracking.register=false",
    ))  # fmt: skip
    try:
        index = open_dataset(digits_s3)
        first = wait_for_checkpoint(job, location, lambda s: s >= PACE_STEPS, 300,
                                    f"a checkpoint at step {PACE_STEPS} or later")  # fmt: skip
        mlflow_down = time.time()
        mlflow_server.stop()
        try:
            # Storage goes down just after a checkpoint early in an epoch: the epoch's data
            # is read already, so the job's next call to storage is the next checkpoint's
            # upload, a few steps on (Ray Train's controller records the last one).
            stored = wait_for_checkpoint(
                job, location,
                lambda s: s >= first + PACE_STEPS + CHECKPOINT_EVERY and s % EPOCH_STEPS in range(5, 26),
                120, f"a checkpoint {PACE_STEPS + CHECKPOINT_EVERY}+ steps after step {first}, "
                "early in an epoch",
            )  # fmt: skip
            s3_down = time.time()
            s3.stop()
            try:
                # A shard read of the project's reader, in Ray tasks on the cluster, that
                # starts while the store is down.
                reader = in_background(read_split, digits_s3, "val", index)
                time.sleep(max(0.0, s3_down + S3_DOWN_S - time.time()))
                assert job.status() == "RUNNING", "the storage outage must fall inside the run"
            finally:
                s3_restart = time.time()
                s3.start()
            s3_up = time.time()
            time.sleep(max(0.0, mlflow_down + MLFLOW_DOWN_S - time.time()))
        finally:
            mlflow_server.start()
        mlflow_up = time.time()
        valid, rows = reader.result(timeout=300)
        status = job.wait(timeout=300)
        done = time.time()
    finally:
        if job.status() not in FINAL:
            job.stop()
    logs = job.logs()
    assert status == "SUCCEEDED", logs[-4000:]
    print(f"seconds after submission: MLflow down {mlflow_down - submitted:.0f}, SeaweedFS down "
          f"{s3_down - submitted:.0f} to {s3_up - submitted:.0f}, MLflow up "
          f"{mlflow_up - submitted:.0f}, job done {done - submitted:.0f}; the job says: "
          f"{[line for line in logs.splitlines() if 'MLflow reachable' in line]}")  # fmt: skip
    # The read waited for the store: every sample came through, none counted bad.
    assert (valid, rows) == (index.num_samples("val"),) * 2

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(f"outage-{tag}").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # No worker-group restart: nothing resumed, and the job had one group of two workers.
    assert client.get_metric_history(run_id, "resumed_from_step") == []
    assert "resumed from" not in logs
    assert len(train_workers(ray_cluster, job.job_id)) == 2
    # Every step's metrics arrived once, in spite of the tracking outage.
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    # Steps kept their pace while MLflow was away (timestamps are taken at the step).
    stamps = {m.step: m.timestamp / 1000 for m in history}
    print(
        f"steps 1 and {STEPS} at {stamps[1] - submitted:.0f} and {stamps[STEPS] - submitted:.0f} s"
    )
    durations = {s: stamps[s] - stamps[s - 1] for s in stamps if s - 1 in stamps}
    # The same number of steps just before and just after MLflow went down: adjacent
    # windows, so that a change in the machine's load (shared, small) weighs on both alike.
    before_steps = [s for s in durations if stamps[s] < mlflow_down][-PACE_STEPS:]
    during_steps = [s for s in durations if mlflow_down <= stamps[s] < s3_down][:PACE_STEPS]
    before = [durations[s] for s in before_steps]
    during = [durations[s] for s in during_steps]
    pace = statistics.median(during) / statistics.median(before)
    print(f"median step before the tracking outage {statistics.median(before):.3f} s "
          f"({len(before)} steps), during it {statistics.median(during):.3f} s "
          f"({len(during)} steps): ratio {pace:.2f}")  # fmt: skip
    # What of it rank 0 spent waiting for its next batch (Ray Data), per step.
    waits = {m.step: m.value for m in client.get_metric_history(run_id, "train/data_wait_fraction")}
    for name, steps in (("before", before_steps), ("during", during_steps)):
        print(f"{name}: steps {min(steps)}-{max(steps)}, median data wait "
              f"{statistics.median(durations[s] * waits[s] for s in steps):.3f} s")  # fmt: skip
    assert len(before) >= PACE_STEPS - 1 and len(during) == PACE_STEPS, (before, during)
    assert pace < 2.0, (before, during)
    # A checkpoint upload waited for the store: the job was held in the save of a
    # checkpoint that was not on storage when the store went down (mid-epoch: no data read
    # there), from at least half the outage before the store was started again until
    # after, with no step in between.
    pause = [s for s in durations if stamps[s - 1] <= s3_restart < stamps[s]]
    assert len(pause) == 1, f"no step before and after the store's restart: {pause}"
    held = pause[0]
    print(f"held after step {held - 1} (step {stored} stored before the outage) for {durations[held]:.0f} s (store restarted "
          f"{s3_restart - stamps[held - 1]:.0f} s into the pause)")  # fmt: skip
    assert (held - 1) % CHECKPOINT_EVERY == 0 and (held - 1) % EPOCH_STEPS, held - 1
    assert held - 1 > stored, f"held after step {held - 1}, stored before the outage: {stored}"
    assert s3_restart - stamps[held - 1] >= S3_DOWN_S / 2, (stamps[held - 1], s3_down, s3_restart)
    # No sample was counted bad.
    bad = client.get_metric_history(run_id, "bad_samples")
    assert bad and all(m.value == 0 for m in bad), bad
    # Every checkpoint left on storage is complete.
    files = checkpoint_files(location)
    assert files and all(CHECKPOINT_FILES <= found for found in files.values()), files
    assert latest_stored_checkpoint(location).step == STEPS


def wait_for_checkpoint(job: SubmittedJob, location: str, ready, timeout: float, what: str) -> int:
    """The run's newest complete checkpoint's step, polled until `ready(step)`."""
    return job.wait_until(lambda: ready(step := newest_step(location)) and step, timeout, what)


def in_background(fn, *args) -> Future:
    """fn(*args) in a daemon thread, so that a failed test's exit does not wait for it."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # handed to whoever asks for the result
            future.set_exception(err)

    threading.Thread(target=run, daemon=True).start()
    return future


def read_split(location: str, split: str, index) -> tuple[int, int]:
    """(valid rows, rows) of one split read through the project's Ray Data reader."""
    ds = build_dataset(DataConfig(location=location), split, train=False, index=index)
    counts = [(int(b["valid"].sum()), len(b["valid"])) for b in ds.iter_batches(batch_size=256)]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)
