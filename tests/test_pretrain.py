"""Pretraining end to end: the embedded default, and jobs submitted to a two-node Ray
cluster with checkpoints on SeaweedFS and tracking on the MLflow server, through
worker failure and job resubmission."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from listeners import loopback
from mlflow.tracking import MlflowClient

from vit_core import create_model
from vit_core.track.runs import RUN_NAME_TAG

ROOT = Path(__file__).resolve().parents[1]
SERVICE_VARIABLES = ("AWS_", "MLFLOW_", "RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH")

# A quick model and schedule: 2 epochs of 22 steps on the 1438 training digits.
SMALL_RUN = [
    "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
    "train.global_batch_size=64", "train.micro_batch_size=32", "train.log_every_steps=2",
    "optim.warmup_steps=5", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
    "scaling.placement_strategy=STRICT_SPREAD",
]  # fmt: skip


@pytest.mark.slow
def test_embedded_default_trains_registers_and_learns(tmp_path):
    """`python pipelines/pretrain.py` with no services: local Ray, local shards, SQLite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VARIABLES)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "pretrain.py"), "--set", "train.epochs=20"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "data" / "digits" / "v1" / "index.json").exists()
    # A readable console: each progress line once, the frameworks' chatter in log files.
    console = proc.stdout + proc.stderr
    progress = re.findall(r"step \d+/\d+ loss .*", console)
    assert progress and len(progress) == len(set(progress)), progress
    for chatter in ("Execution plan of Dataset", "Reporting training result",
                    "Successfully registered model", "Progress bars disabled"):  # fmt: skip
        assert chatter not in console, console[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("vit-digits").experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = 'digits-tiny'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["optim.lr"] == "0.002"
    assert run.data.params["cluster.num_workers"] == "2"
    # The threshold a broken model or a broken data path would fail: chance is 10%. After 20
    # epochs runs end near 0.8; after 12 they ended between 0.48 and 0.57, too close to it.
    assert run.data.metrics["val/top1"] >= 0.5, run.data.metrics
    assert run.data.metrics["train/images_per_s"] > 0
    assert 0.0 <= run.data.metrics["train/data_wait_fraction"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts >= {"plots/curves.png", "plots/confusion_matrix.png", "plots/attention.png"}
    versions = client.search_model_versions("name='vit-digits-pretrain'")
    assert len(versions) == 1
    assert versions[0].tags["dataset"] == "data/digits/v1"


@pytest.mark.slow
def test_fsdp_on_cpu_workers_trains_and_resumes_sharded_state(tmp_path):
    """scaling.strategy=fsdp on two CPU workers (gloo): parameters and optimiser state are
    sharded. A second run under the same name with one more epoch resumes from the first
    run's checkpoint, loading the full state back into the shards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VARIABLES)}
    small = [o for o in SMALL_RUN if not o.startswith("scaling.placement_strategy")]
    command = [sys.executable, str(ROOT / "pipelines" / "pretrain.py")]
    for override in [*small, "scaling.strategy=fsdp", "run_name=fsdp"]:
        command += ["--set", override]
    outputs = []
    for epochs in (1, 2):
        proc = subprocess.run(
            [*command, "--set", f"train.epochs={epochs}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(proc.stdout)
    assert "resuming run" not in outputs[0]
    assert "resuming run fsdp from step 22 " in outputs[1], outputs[1][-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vit-digits")
    (run,) = client.search_runs([experiment.experiment_id])
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [22]
    assert run.data.tags["train.model_wrapper"] == "FSDPVisionTransformer"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(2, 45, 2))  # each step logged once, across both runs
    # It learned: chance is 0.1 (0.016 the spread of guessing over the 359 validation
    # digits); 44 steps of two epochs read in no fixed order ended at 0.19-0.3.
    assert run.data.metrics["val/top1"] > 0.15
    version = client.search_model_versions("name='vit-digits-pretrain'")[-1]
    model = create_model(checkpoint=str(tmp_path / "runs" / "fsdp" / "best_model"))
    assert model.config.embed_dim == 48 and version.tags["run_name"] == "fsdp"

    # The finished run submitted again: nothing trains, nothing is registered twice.
    again = subprocess.run(
        [*command, "--set", "train.epochs=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "run fsdp already finished at step 44 and is registered as vit-digits-pretrain " \
        "version 2" in again.stdout, again.stdout[-2000:]  # fmt: skip
    assert "local Ray" not in again.stdout  # no cluster was started for it
    assert len(client.search_model_versions("name='vit-digits-pretrain'")) == 2


@pytest.mark.slow
def test_job_on_two_nodes_resumes_after_a_killed_worker_and_registers(
    backbone_job, ray_cluster, mlflow_server, digits_s3
):
    """The session's pretraining job (conftest.backbone_job): two workers on two nodes, one
    killed once two checkpoints were stored; the job goes on from a checkpoint, ends and
    registers its model."""
    from jobs import stored_checkpoints
    from ray.util.state import list_nodes

    job = backbone_job
    assert job["killed"], "training workers should have been running"
    # While they ran, every listening socket of the cluster's processes, the training
    # workers' process group (torch's store, gloo) among them, was on 127.0.0.1.
    assert job["alive_pids"] & {pid for pid, _ in job["listening"]}, "rank 0 serves the store"
    not_loopback = {(pid, a) for pid, a in job["listening"] if not loopback(a)}
    assert not not_loopback, f"listening beyond 127.0.0.1 (pid, address): {not_loopback}"

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(job["experiment"]).experiment_id])
    assert len(runs) == 1, "a restarted run continues its MLflow run"
    run = runs[0]
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps == list(range(2, 67, 2)), steps  # continuous, to the end of 3 epochs
    location = f"{job['storage']}/{job['run_name']}"
    assert max(c["step"] for c in stored_checkpoints(location)) == 66
    version = client.search_model_versions(f"name='{job['name']}'")[0]
    assert version.tags["checkpoint_uri"].startswith(f"{location}/checkpoint_")
    # Ray Train started a second worker group, which ran the schedule to its end.
    assert len(job["workers"]) > 2
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    # The restarted worker group went on from a checkpoint, not from step 0.
    assert len(resumed) == 1 and resumed[0].value >= 8, resumed
    assert "resumed from " in job["logs"]
    # STRICT_SPREAD: both worker groups ran on the two nodes, so nothing could share a disk.
    cluster_nodes = {n.node_id for n in list_nodes(address=ray_cluster.dashboard_url)
                     if n.state == "ALIVE"}  # fmt: skip
    worker_nodes = run.data.tags["cluster.worker_nodes"].split(",")
    assert len(worker_nodes) == 2 and set(worker_nodes) == cluster_nodes
    assert run.data.tags["train.model_wrapper"] == "DistributedDataParallel"
    assert run.data.params["data.location"] == digits_s3
    assert run.data.metrics["val/top1"] > 0.2  # above chance after three short epochs
    # Secrets never reach MLflow params or the logged config.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in str(v) for v in run.data.params.values())
    assert secret not in job["logs"]


def test_missing_dataset_is_one_clear_error_before_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VARIABLES)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "pretrain.py"),
         "--set", f"data.location={tmp_path / 'nowhere'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started
