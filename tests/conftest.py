"""Fixtures that start the real services on 127.0.0.1 and stop them afterwards.

`s3` (SeaweedFS), `mlflow_server` (MLflow on SQLite, artifacts in that S3) and
`ray_cluster` (a head and a worker node) are session-wide: each starts once, when a
test first asks for it. They export the standard variables (AWS_*, MLFLOW_TRACKING_URI,
RAY_ADDRESS) so the code under test finds them as a user's job would.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
import uuid

# Drivers started here resolve "localhost" to 127.0.0.1, as the stack's Ray nodes do.
# Read by Ray when it is imported, so it is set before any test imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
# Ray reads its auth settings when imported: the test cluster's token is fixed up front,
# so a test module that imports ray early still talks to the cluster.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# No test may reach a real cloud account through a developer's own settings.
for _name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "RAY_ADDRESS"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402

from infra.local.stack import (  # noqa: E402
    MLflowServer,
    PostgresServer,
    RayCluster,
    SeaweedFS,
    StackError,
    postgres_bindir,
)


class EnvPatch:
    """Set environment variables for the session and put the old values back."""

    def __init__(self) -> None:
        self.saved: dict[str, str | None] = {}

    def set(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def restore(self) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def session_env():
    patch = EnvPatch()
    yield patch
    patch.restore()


@pytest.fixture(scope="session")
def s3(tmp_path_factory, session_env) -> SeaweedFS:
    store = SeaweedFS(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key="test" + secrets.token_hex(4),
        secret_key=secrets.token_urlsafe(18),
        buckets=("vit", "mlflow"),
    )
    store.start()
    session_env.set(store.env())
    yield store
    store.stop()


@pytest.fixture
def private_s3(tmp_path, monkeypatch) -> SeaweedFS:
    """A SeaweedFS of one test's own, which it may stop and restart (the session's `s3` is
    shared), with its variables set for that test only."""
    store = SeaweedFS(
        tmp_path / "private-seaweedfs",
        access_key="test" + secrets.token_hex(4),
        secret_key=secrets.token_urlsafe(18),
        buckets=("vit",),
    )
    store.start()
    for key, value in store.env().items():
        monkeypatch.setenv(key, value)
    yield store
    store.stop()


@pytest.fixture
def s3_prefix(s3) -> str:
    """A fresh s3:// prefix in the `vit` bucket for one test."""
    return f"s3://vit/tests/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory, session_env) -> MLflowServer:
    server = MLflowServer(tmp_path_factory.mktemp("mlflow"), s3.env())
    server.start()
    session_env.set(server.env())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> PostgresServer:
    """PostgreSQL on 127.0.0.1 (Debian's `postgresql` package, which .ci/run installs).
    Where its programs are missing, the tests that need it skip, except in CI (CI=true),
    where they fail."""
    try:
        postgres_bindir()
    except StackError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests: {err}")
        pytest.skip(str(err))
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    server.start()
    yield server
    server.stop()
    server.remove_data()


@pytest.fixture(scope="session")
def ray_cluster(s3, mlflow_server, tmp_path_factory, session_env) -> RayCluster:
    cluster = RayCluster(
        tmp_path_factory.mktemp("ray"),
        workers=1,
        env_extra={**s3.env(), **mlflow_server.env()},
        auth_token=os.environ["RAY_AUTH_TOKEN"],
    )
    cluster.start()
    session_env.set(cluster.env())
    yield cluster
    import ray

    ray.shutdown()
    cluster.stop()


@pytest.fixture
def ray_client(ray_cluster):
    """A driver connected to the session's multi-node cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def digits_s3(s3) -> str:
    """The digits dataset (32 px PNG shards) in the session's S3 store."""
    from vit_core.data import make_digits_shards

    location = f"s3://vit/datasets/digits-{uuid.uuid4().hex[:8]}/v1"
    make_digits_shards(location, image_size=32, progress=False)
    return location


# A quick model and schedule for jobs on the two-node cluster: two workers on different
# nodes, 22 steps per epoch on the 1438 training digits.
SMALL_JOB = [
    "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
    "train.global_batch_size=64", "train.micro_batch_size=32", "train.log_every_steps=2",
    "optim.warmup_steps=5", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
    "scaling.placement_strategy=STRICT_SPREAD",
]  # fmt: skip


@pytest.fixture(scope="session")
def backbone_job(ray_cluster, mlflow_server, digits_s3) -> dict:
    """The session's pretraining job: pipelines/pretrain.py on the cluster (3 epochs at
    32 px, two workers on different nodes, a checkpoint every 8 steps), registered with the
    alias `backbone`. Once two checkpoints are stored one training worker is killed, so Ray
    Train restarts the group from the newest: test_pretrain checks that recovery and the
    sockets the trainers listened on, the fine-tuning and workflow tests start from the
    model (one job for both, as each costs a minute). Returns what those checks look at."""
    from jobs import SubmittedJob, sets, stored_checkpoints, train_workers
    from listeners import group_pids, listeners

    tag = uuid.uuid4().hex[:6]
    run = {"run_name": f"pre-{tag}", "storage": f"s3://vit/runs-{tag}",
           "experiment": f"pre-{tag}", "name": f"backbone-{tag}"}  # fmt: skip
    job = SubmittedJob(ray_cluster, "pretrain.py", sets(
        *SMALL_JOB, f"run_name={run['run_name']}", f"storage={run['storage']}",
        f"data.location={digits_s3}", "train.epochs=3", "checkpoint.every_steps=8",
        f"tracking.experiment={run['experiment']}", f"tracking.registered_model={run['name']}",
        "tracking.alias=backbone",
    ))  # fmt: skip
    location = f"{run['storage']}/{run['run_name']}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(stored_checkpoints(location)) < 2:
        assert job.status() in ("PENDING", "RUNNING"), job.logs()[-3000:]
        time.sleep(1)
    alive = [w for w in train_workers(ray_cluster, job.job_id) if w.state == "ALIVE"]
    run["alive_pids"] = {w.pid for w in alive}
    # Every listening socket of the cluster's processes and the trainers' (torch's store, gloo).
    pids = run["alive_pids"].union(*(group_pids(pgid) for pgid in ray_cluster.pgids))
    run["listening"] = listeners(pids)
    run["killed"] = bool(alive)
    if alive:
        os.kill(alive[-1].pid, signal.SIGKILL)
    status = job.wait()
    run["logs"] = job.logs()
    assert status == "SUCCEEDED", run["logs"][-4000:]
    run["workers"] = train_workers(ray_cluster, job.job_id)
    run["job_id"] = job.job_id
    return run


@pytest.fixture(scope="session")
def pretrained_backbone(backbone_job) -> str:
    """The registered name of the session's pretrained backbone (alias `backbone`)."""
    return backbone_job["name"]


@pytest.fixture(scope="session")
def dagster_services(ray_cluster, mlflow_server, s3, tmp_path_factory, session_env):
    """Dagster's daemon and webserver on 127.0.0.1 over a temporary DAGSTER_HOME, loading
    pipelines/workflows/definitions.py, with the session's services in their environment.
    Schedules and the sensor read VIT_WORKFLOWS_SETTINGS, a file the tests write."""
    from infra.local.dagster import DagsterServices

    root = tmp_path_factory.mktemp("dagster")
    settings = root / "settings.yaml"
    settings.write_text("{}\n")
    services = DagsterServices(root / "home", env_extra={
        **s3.env(), **mlflow_server.env(), **ray_cluster.env(),
        "VIT_WORKFLOWS_SETTINGS": str(settings),
    })  # fmt: skip
    services.start()
    services.settings = settings
    session_env.set(services.env())
    yield services
    services.stop()
