"""A worker node lost in the middle of a training job, as a preempted or failed machine:
its whole process group (raylet, object store, trainers, data tasks) SIGKILLed.

The test runs on a two-node cluster of its own whose nodes have 3 CPUs each, with
trainers of 2 CPUs: Ray's elastic mode sizes a worker group by how many workers fit each
live node's total resources, so only a node with a CPU left over beside its trainer keeps
Ray Data's read tasks running (on the session's 2-CPU nodes no worker size does; README,
Running against services). The session's S3 store and MLflow server serve both clusters.

A job with a fixed count of two loses the worker node and stops with one line after its
wait; then an elastic job (`scaling.num_workers=1..2`) starts on the head alone, grows to
two workers when the node is back, and goes on with one when the node is lost again."""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest
from conftest import SMALL_JOB
from jobs import FINAL, SubmittedJob, newest_step, sets
from mlflow.tracking import MlflowClient

from infra.local.stack import RayCluster
from vit_core import storage
from vit_core.train.checkpoint import latest_stored_checkpoint

WAIT_S = 15  # scaling.wait_for_workers_s: one placement attempt
# Global batch 64 on 1438 training digits: 22 steps an epoch; a checkpoint every 10 steps.
JOB = [o for o in SMALL_JOB if not o.startswith("scaling.")] + [
    "scaling.cpus_per_worker=2", "scaling.placement_strategy=SPREAD",
    f"scaling.wait_for_workers_s={WAIT_S}", "train.log_every_steps=1",
    "checkpoint.every_steps=10", "tracking.register=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def roomy_cluster(s3, mlflow_server, tmp_path_factory):
    """Head and one worker node of 3 CPUs each, on 127.0.0.1, stopped after the module;
    `start_s` is how long it took to start."""
    cluster = RayCluster(
        tmp_path_factory.mktemp("ray-3cpu"),
        workers=1,
        cpus_per_node=3,
        env_extra={**s3.env(), **mlflow_server.env()},
        auth_token=os.environ["RAY_AUTH_TOKEN"],
    )
    start = time.monotonic()
    cluster.start(timeout=240)
    cluster.start_s = time.monotonic() - start
    yield cluster
    cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two jobs, two node losses and a node start: slow when loaded
def test_a_lost_node_stops_a_fixed_run_and_shrinks_an_elastic_one_which_grows_back(
    roomy_cluster, mlflow_server, digits_s3
):
    client = MlflowClient(mlflow_server.uri)
    tag = uuid.uuid4().hex[:6]
    root = f"s3://vit/runs-nodes-{tag}"
    began = time.monotonic()

    def say(what: str) -> None:
        print(f"{time.monotonic() - began:.0f} s: {what}", flush=True)

    # A fixed count of two: the node is lost, the restarted group cannot be placed; the
    # job stops in one line after one wait, and its run is marked FAILED.
    location = storage.join(root, "fixed")
    job = SubmittedJob(roomy_cluster, "pretrain.py", sets(
        *JOB, "scaling.num_workers=2", "run_name=fixed", f"storage={root}",
        f"data.location={digits_s3}", "train.steps=2000", f"tracking.experiment=fixed-{tag}",
    ))  # fmt: skip
    try:
        job.wait_until(lambda: newest_step(location) >= 10, 300, "a checkpoint at step 10")
        tenth = time.monotonic()
        job.wait_until(lambda: newest_step(location) >= 20, 300, "a checkpoint at step 20")
        steps_per_s = 10 / (time.monotonic() - tenth)  # sizes the elastic run below
        roomy_cluster.kill_worker_node()
        lost = time.monotonic()
        say(f"fixed: {steps_per_s:.1f} steps/s; node lost at step {newest_step(location)}")
        status = job.wait(timeout=300)
        took = time.monotonic() - lost
    finally:
        if job.status() not in FINAL:
            job.stop()
    logs = job.logs()
    assert status == "FAILED", logs[-4000:]
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not place 2 workers x {CPU: 2}" in errors[0], logs[-3000:]
    assert f"within {WAIT_S} s (scaling.wait_for_workers_s)" in errors[0], errors
    assert "Traceback" not in logs, logs[-3000:]
    say(f"fixed: stopped {took:.0f} s after the node was lost: {errors[0]}")
    # The wait, plus the head noticing the loss and the job's ending.
    assert took < WAIT_S + 90, took
    (run,) = client.search_runs([client.get_experiment_by_name(f"fixed-{tag}").experiment_id])
    assert run.info.status == "FAILED"

    # An elastic run on the one node left: one worker, two once the node is back, one
    # again when it is lost again. Its budget outlasts a node's start (taken as the
    # cluster's) plus Ray's look at the nodes (up to 20 s old, every 5 s here), twice
    # over at the pace measured above.
    steps = min(2000, 60 + round(2 * steps_per_s * (roomy_cluster.start_s + 25)))
    location = storage.join(root, "elastic")
    job = SubmittedJob(roomy_cluster, "pretrain.py", sets(
        *JOB, "scaling.num_workers=1..2", "scaling.elastic_resize_monitor_interval_s=5",
        "run_name=elastic", f"storage={root}", f"data.location={digits_s3}",
        f"train.steps={steps}", f"train.eval_every_steps={steps // 4}",
        f"tracking.experiment=elastic-{tag}",
    ))  # fmt: skip
    try:
        job.wait_until(lambda: groups(job) == [1] and newest_step(location) >= 10, 300,
                       "a checkpoint of a group of 1 worker")  # fmt: skip
        stored = newest_step(location)
        say(f"elastic ({steps} steps): 1 worker, step {stored} stored")
        roomy_cluster.start_worker_node(timeout=240)
        say(f"node back at step {newest_step(location)}")
        job.wait_until(lambda: groups(job) == [1, 2], 240, "a group of 2 workers")
        grown = newest_step(location)
        say(f"2 workers from step {grown}")
        job.wait_until(lambda: newest_step(location) >= grown + 10, 240,
                       f"a checkpoint after step {grown} with 2 workers")  # fmt: skip
        roomy_cluster.kill_worker_node()
        lost_at = newest_step(location)
        say(f"node lost at step {lost_at}")
        job.wait_until(lambda: groups(job) == [1, 2, 1], 240, "a group of 1 worker again")
        say(f"1 worker from step {newest_step(location)}")
        status = job.wait(timeout=600)
        say(status)
    finally:
        if job.status() not in FINAL:
            job.stop()
    logs = job.logs()
    assert status == "SUCCEEDED", logs[-4000:]
    # Each group kept the recipe's global batch of 64.
    sizes = re.findall(r"\b(\d+) workers?: (\d+) micro-batch(?:es)? of (\d+) per worker per step "
                       r"\(global batch (\d+)\)", logs)  # fmt: skip
    assert [(int(n), int(k) * int(m) * int(n)) for n, k, m, _ in sizes] == [
        (1, 64), (2, 64), (1, 64)], sizes  # fmt: skip
    (run,) = client.search_runs([client.get_experiment_by_name(f"elastic-{tag}").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # The step budget held across the sizes: every step logged once; each group resumed
    # from a checkpoint of the one before (stored by then, or at the loss).
    logged = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert logged == list(range(1, steps + 1))
    resumed = [int(m.value) for m in client.get_metric_history(run_id, "resumed_from_step")]
    assert len(resumed) == 2 and resumed[0] >= stored and resumed[1] >= lost_at, (
        resumed, stored, lost_at)  # fmt: skip
    assert latest_stored_checkpoint(location).step == steps
    assert "Traceback" not in logs, logs[-3000:]
    # It learned: validation well above the 10% of guessing digits.
    assert run.data.metrics["val/top1"] > 0.6, run.data.metrics


def groups(job: SubmittedJob) -> list[int]:
    """The sizes of the job's worker groups so far, as rank 0 prints them at each start."""
    # Ray prefixes a worker's lines with its name and pid.
    return [int(n) for n in re.findall(r"\b(\d+) workers?: \d+ micro-batch", job.logs())]
