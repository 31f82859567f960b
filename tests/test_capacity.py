"""Capacity faults on the two-node cluster (2 CPUs per node): workers the cluster cannot
place stop the job within the configured wait, in one line, with the MLflow run FAILED;
trainers may not take the CPUs Ray Data needs; an elastic run counts workers per node
and is stopped after the wait below its minimum."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
from conftest import SMALL_JOB
from jobs import SubmittedJob, sets
from mlflow.tracking import MlflowClient

from vit_core.train.config import TrainConfig
from vit_core.train.scaling import (
    BelowMinimumWatch,
    CapacityError,
    check_data_cpus,
    workers_that_fit,
)


def test_unplaceable_workers_stop_within_the_limit_in_one_line(
    ray_cluster, mlflow_server, digits_s3
):
    tag = uuid.uuid4().hex[:6]
    # A 3-CPU worker fits no 2-CPU node, though the cluster has 4 CPUs in all.
    job = SubmittedJob(ray_cluster, "pretrain.py", sets(
        *SMALL_JOB, "scaling.num_workers=1", "scaling.cpus_per_worker=3",
        "scaling.placement_strategy=PACK", "scaling.wait_for_workers_s=5",
        f"run_name=cap-{tag}", f"storage=s3://vit/runs-cap-{tag}", f"data.location={digits_s3}",
        f"tracking.experiment=cap-{tag}", "tracking.register=false",
    ))  # fmt: skip
    started = time.monotonic()
    assert job.wait(timeout=300) == "FAILED", job.logs()[-3000:]
    took = time.monotonic() - started
    logs = job.logs()
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, logs[-3000:]
    print(f"stopped {took:.0f} s after submission: {errors[0]}")
    assert errors[0].startswith(
        "error: could not place 1 worker x {CPU: 3} (PACK) within 5 s (scaling.wait_for_workers_s): "
        "the cluster has 2 nodes with CPU 2, 2"
    ), errors[0]
    # (Ray Train's controller logs its own traceback of the timeout above this line.)
    # Job start-up (runtime env, imports, data index) comes on top of the 5 s wait.
    assert took < 5 + 180, took
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(f"cap-{tag}")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"


def test_trainers_leave_the_data_pipeline_its_cpus(ray_client):
    cfg = TrainConfig()
    cfg.scaling.data_cpus = 1
    check_data_cpus(cfg, 3)  # 3 of the 4 CPUs: one left for reading and decoding
    with pytest.raises(CapacityError, match=r"4 trainers x 1 CPU would leave 0 of the cluster's 4 CPUs"):
        check_data_cpus(cfg, 4)
    cfg.scaling.cpus_per_worker = 0.5
    check_data_cpus(cfg, 4)


def test_workers_that_fit_are_counted_per_node_as_elastic_mode_does(ray_client):
    cfg = TrainConfig()
    cfg.scaling.num_workers = "1..8"
    fits = {}
    for cpus in (1.0, 1.5, 2.0, 3.0):
        cfg.scaling.cpus_per_worker = cpus
        fits[cpus] = workers_that_fit(cfg)
    # Two nodes of 2 CPUs: what fits each node, not the cluster's 4 CPUs divided.
    assert fits == {1.0: 4, 1.5: 2, 2.0: 2, 3.0: 0}


def test_an_elastic_run_below_its_minimum_is_stopped_after_the_wait(ray_client):
    """The driver's watch: fewer than MIN workers fit for scaling.wait_for_workers_s, so it
    interrupts the driver as Ctrl-C would (Ray Train then aborts the run)."""
    cfg = TrainConfig()
    cfg.scaling.num_workers = "1..2"
    cfg.scaling.cpus_per_worker = 3.0  # no 2-CPU node holds one
    cfg.scaling.wait_for_workers_s = 2.0
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(time.monotonic()))
    try:
        started = time.monotonic()
        with BelowMinimumWatch(cfg, interval_s=0.5) as watch:
            while not interrupted and time.monotonic() - started < 30:
                time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert watch.fired and interrupted
    assert 2.0 <= interrupted[0] - started < 15
    assert watch.message().startswith(
        "fewer than 1 worker x {CPU: 3} fit the cluster for 2 s (scaling.wait_for_workers_s, "
        "scaling.num_workers=1..2): the cluster has 2 nodes with CPU 2, 2"
    ), watch.message()
