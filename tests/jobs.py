"""Submitting the project's job scripts to the session's Ray cluster, as a user's
`ray job submit --working-dir . -- python pipelines/X.py ...` does."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def addressed_to(ray_cluster):
    """A context in which Ray's job and state clients reach `ray_cluster`. They let
    RAY_API_SERVER_ADDRESS (or RAY_ADDRESS) override the address they are given, and the
    session points those at its own cluster; a test's second cluster must get its own
    jobs and actors."""
    return mock.patch.dict(os.environ, {"RAY_API_SERVER_ADDRESS": ray_cluster.dashboard_url})


def job_client(ray_cluster):
    """Ray's JobSubmissionClient for `ray_cluster` (it reads the address when made)."""
    from ray.job_submission import JobSubmissionClient

    with addressed_to(ray_cluster):
        return JobSubmissionClient(ray_cluster.dashboard_url)


class SubmittedJob:
    def __init__(self, ray_cluster, script: str, args: list[str]) -> None:
        self.client = job_client(ray_cluster)
        self.job_id = submit(self.client, shlex.join(["python", f"pipelines/{script}", *args]))

    def wait(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = str(self.client.get_job_status(self.job_id))
            if status in FINAL:
                return status
            time.sleep(0.5)
        raise AssertionError(f"job {self.job_id} still running after {timeout}s:\n"
                             f"{self.logs()[-3000:]}")  # fmt: skip

    def wait_until(self, ready, timeout: float, what: str):
        """Poll `ready()` every 0.5 s until it returns something true, and return that.
        Fails with the job's log if the job ends first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not (got := ready()):
            status = self.status()
            assert status in ("PENDING", "RUNNING"), f"job {status} before {what}:\n{self.logs()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s:\n{self.logs()[-3000:]}"
            time.sleep(0.5)
        return got

    def status(self) -> str:
        return str(self.client.get_job_status(self.job_id))

    def logs(self) -> str:
        return self.client.get_job_logs(self.job_id)

    def stop(self) -> None:
        self.client.stop_job(self.job_id)


def submit(client, entrypoint: str, timeout: float = 90) -> str:
    """Submit with the repository as working dir; returns the submission id."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": str(ROOT), "excludes": ["data/", "runs/", "*.db"]},
            )
        except RuntimeError as err:
            # A node's job agent may still be starting on a loaded machine.
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(3)


def sets(*overrides: str) -> list[str]:
    """--set KEY=VALUE arguments."""
    return [part for o in overrides for part in ("--set", o)]


def run_job(ray_cluster, script: str, args: list[str], timeout: float = 600) -> str:
    """Submit, wait for success, return the job's log."""
    job = SubmittedJob(ray_cluster, script, args)
    status = job.wait(timeout)
    logs = job.logs()
    assert status == "SUCCEEDED", f"{script} {status}:\n{logs[-4000:]}"
    return logs


def stored_checkpoints(location: str) -> list[dict]:
    """The progress.json of every checkpoint stored under a run's folder."""
    from vit_core import storage

    return [json.loads(storage.read_bytes(uri)) for uri in storage.list_files(location)
            if "/checkpoint_" in uri and uri.endswith("/progress.json")]  # fmt: skip


def train_workers(ray_cluster, submission_id: str) -> list:
    """The Ray Train workers (alive and dead) of a submitted job, from Ray's state API."""
    from ray.util.state import list_actors

    job_id = job_client(ray_cluster).get_job_info(submission_id).job_id
    with addressed_to(ray_cluster):
        workers = list_actors(address=ray_cluster.dashboard_url, detail=True,
                              filters=[("class_name", "=", "RayTrainWorker")],
                              raise_on_missing_output=False)  # fmt: skip
    return [w for w in workers if job_id and w.job_id == job_id]


def newest_step(location: str) -> int:
    """The newest complete checkpoint's step (0 if none), read while the job runs: Ray
    Train may delete a checkpoint (checkpoint.keep_last) between the listing and the read;
    then ask again."""
    from vit_core import storage
    from vit_core.train.checkpoint import latest_stored_checkpoint

    for _ in range(20):
        try:
            found = latest_stored_checkpoint(location)
            return found.step if found else 0
        except storage.StorageError:
            time.sleep(0.1)
    raise AssertionError(f"the checkpoints under {location} could not be read 20 times running")
