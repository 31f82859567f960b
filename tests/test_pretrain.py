"""Pretraining end to end: the embedded default, and jobs submitted to a two-node Ray
cluster with checkpoints on SeaweedFS and tracking on the MLflow server, through
worker failure and job resubmission."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from jobs import submit
from listeners import group_pids, listeners, loopback
from mlflow.tracking import MlflowClient

from vit_core import create_model, storage
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
    assert run.data.metrics["val/top1"] > 0.2  # it learned: chance is 0.1
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


@pytest.fixture(scope="module")
def digits_on_s3(s3) -> str:
    from vit_core.data import make_digits_shards

    location = f"s3://vit/datasets/digits-{uuid.uuid4().hex[:8]}/v1"
    make_digits_shards(location, image_size=32, progress=False)
    return location


class Job:
    """One pretraining job submitted to the cluster through Ray's Jobs API."""

    def __init__(self, ray_cluster, digits: str, run_name: str, extra: list[str]) -> None:
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(ray_cluster.dashboard_url)
        self.run_name = run_name
        self.storage = f"s3://vit/runs-{run_name}"
        self.overrides = [
            *SMALL_RUN, f"run_name={run_name}", f"storage={self.storage}",
            f"data.location={digits}", f"tracking.experiment=exp-{run_name}",
            f"tracking.registered_model=model-{run_name}", *extra,
        ]  # fmt: skip

    def submit(self) -> str:
        args = " ".join(f"--set {o}" for o in self.overrides)
        self.job_id = submit(self.client, f"python pipelines/pretrain.py {args}")
        return self.job_id

    def wait(self, timeout: float = 600) -> str:
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client.get_job_status(self.job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status
            time.sleep(2)
        raise AssertionError(
            f"job {self.job_id} still running after {timeout}s:\n{self.logs()[-3000:]}"
        )

    def logs(self) -> str:
        return self.client.get_job_logs(self.job_id)

    def checkpoints(self) -> list[dict]:
        found = storage.list_files(storage.join(self.storage, self.run_name))
        return [
            json.loads(storage.read_bytes(uri))
            for uri in found
            if "/checkpoint_" in uri and uri.endswith("/progress.json")
        ]

    def wait_for_checkpoints(self, count: int = 2, timeout: float = 300) -> None:
        """Wait until `count` checkpoints are on storage, so there is one to resume from."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.checkpoints()) < count:
            time.sleep(1)
        found = len(self.checkpoints())
        assert found >= count, f"{found} checkpoints within {timeout}s:\n{self.logs()[-3000:]}"

    def mlflow_runs(self, uri: str):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(f"exp-{self.run_name}")
        return client, client.search_runs([exp.experiment_id])


def train_workers(ray_cluster, job_id: str | None = None) -> list:
    from ray.util.state import list_actors

    workers = list_actors(
        address=ray_cluster.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        raise_on_missing_output=False,
    )
    if job_id is None:
        return workers
    return [
        w for w in workers if w.job_id and w.job_id in job_submission_job_ids(ray_cluster, job_id)
    ]


def job_submission_job_ids(ray_cluster, submission_id: str) -> set[str]:
    from ray.job_submission import JobSubmissionClient

    details = JobSubmissionClient(ray_cluster.dashboard_url).get_job_info(submission_id)
    return {details.job_id} if details.job_id else set()


def ray_nodes(ray_cluster) -> list[dict]:
    from ray.util.state import list_nodes

    return [
        {"NodeID": n.node_id}
        for n in list_nodes(address=ray_cluster.dashboard_url)
        if n.state == "ALIVE"
    ]


def assert_one_complete_run(job: Job, mlflow_server, total_steps: int) -> None:
    client, runs = job.mlflow_runs(mlflow_server.uri)
    assert len(runs) == 1, "a resumed or restarted run continues its MLflow run"
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = sorted({m.step for m in history})
    assert steps == list(range(2, total_steps + 1, 2)), steps  # continuous, to the end
    assert max(c["step"] for c in job.checkpoints()) == total_steps
    version = client.search_model_versions(f"name='model-{job.run_name}'")[0]
    assert version.tags["checkpoint_uri"].startswith(f"{job.storage}/{job.run_name}/checkpoint_")


@pytest.mark.slow
def test_job_on_two_nodes_resumes_after_a_killed_worker_and_registers(ray_cluster, mlflow_server, digits_on_s3):
    job = Job(
        ray_cluster, digits_on_s3, f"kill-{uuid.uuid4().hex[:6]}",
        ["train.epochs=3", "checkpoint.every_steps=8"],
    )  # fmt: skip
    job.submit()
    job.wait_for_checkpoints()
    alive = [w for w in train_workers(ray_cluster, job.job_id) if w.state == "ALIVE"]
    assert alive, "training workers should be running"
    assert_cluster_listens_on_loopback_only(ray_cluster, {w.pid for w in alive})
    victim = alive[-1]
    print(f"killing train worker pid {victim.pid} on node {victim.node_id}")
    os.kill(victim.pid, signal.SIGKILL)
    assert job.wait() == "SUCCEEDED", job.logs()[-4000:]
    assert_one_complete_run(job, mlflow_server, total_steps=66)
    # Ray Train started a second worker group, which ran the schedule to its end.
    assert len(train_workers(ray_cluster, job_id=job.job_id)) > 2
    client, runs = job.mlflow_runs(mlflow_server.uri)
    resumed = client.get_metric_history(runs[0].info.run_id, "resumed_from_step")
    # The restarted worker group went on from a checkpoint, not from step 0.
    assert len(resumed) == 1 and resumed[0].value >= 8, resumed
    assert "resumed from " in job.logs()
    # STRICT_SPREAD: both worker groups ran on the two nodes, so nothing could share a disk.
    cluster_nodes = {n["NodeID"] for n in ray_nodes(ray_cluster)}
    worker_nodes = runs[0].data.tags["cluster.worker_nodes"].split(",")
    assert len(worker_nodes) == 2 and set(worker_nodes) == cluster_nodes
    assert runs[0].data.tags["train.model_wrapper"] == "DistributedDataParallel"
    assert runs[0].data.params["data.location"] == digits_on_s3
    assert runs[0].data.metrics["val/top1"] > 0.2  # above chance after three short epochs
    # Secrets never reach MLflow params or the logged config.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in str(v) for v in runs[0].data.params.values())
    assert secret not in job.logs()


def assert_cluster_listens_on_loopback_only(ray_cluster, trainer_pids: set[int]) -> None:
    """Every listening socket of the cluster's processes, the training workers' process
    group (torch's store, gloo) among them, is on 127.0.0.1."""
    pids = trainer_pids.union(*(group_pids(pgid) for pgid in ray_cluster.pgids))
    found = listeners(pids)
    assert trainer_pids & {pid for pid, _ in found}, "rank 0 serves the process group's store"
    not_loopback = {(pid, a) for pid, a in found if not loopback(a)}
    assert not not_loopback, f"listening beyond 127.0.0.1 (pid, address): {not_loopback}"


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
