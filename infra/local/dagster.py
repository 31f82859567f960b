"""Dagster's daemon (schedules, sensors, the run queue) and webserver (the UI, GraphQL)
on 127.0.0.1 over one instance directory (DAGSTER_HOME), loading
pipelines/workflows/definitions.py.

    python -m infra.local.dagster up [--home .dagster] [--port 3000] [--db postgres]
    python -m infra.local.dagster down [--home .dagster]      # `make pipelines-up`/`-down`

The instance config is pipelines/workflows/dagster.yaml (run queue with one run per
pipeline). Storage (runs, events, schedules) is SQLite in DAGSTER_HOME, the same the
in-process demo writes, so the UI shows the demo's runs; with `--db postgres` it is the
PostgreSQL database named by DAGSTER_PG_HOST, DAGSTER_PG_PORT, DAGSTER_PG_USER,
DAGSTER_PG_DB and DAGSTER_PG_PASSWORD (the local stack's `--db postgres` writes them to
.stack/env), as the Helm chart's instance reads its password. The instance's schema is
migrated before the processes start. Both processes inherit this environment
(RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_*): the steps they run submit to that cluster.
Secrets stay in the environment; nothing here writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from infra.local.stack import (
    HOST,
    ProcessGroupService,
    find_binary,
    free_port,
    http_ok,
    kill_group,
    launch,
    require_free,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "pipelines" / "workflows" / "definitions.py"
INSTANCE_YAML = ROOT / "pipelines" / "workflows" / "dagster.yaml"


DATABASES = ("sqlite", "postgres")
# dagster-postgres' storage for runs, events and schedules, every field from the
# environment: the instance file holds no address and no password.
POSTGRES_VARIABLES = {
    "hostname": "DAGSTER_PG_HOST", "port": "DAGSTER_PG_PORT", "username": "DAGSTER_PG_USER",
    "db_name": "DAGSTER_PG_DB", "password": "DAGSTER_PG_PASSWORD",
}  # fmt: skip
# The driver named: SQLAlchemy 2.1 takes psycopg 3 for a plain postgresql:// URL, whose
# server-side parameters break dagster-postgres' `NOTIFY run_events, %(id)s`; psycopg2
# (installed with dagster-postgres) is the driver it is written for.
POSTGRES_STORAGE = {"storage": {"postgres": {"postgres_db": {
    **{key: {"env": name} for key, name in POSTGRES_VARIABLES.items()},
    "scheme": "postgresql+psycopg2",
}}}}  # fmt: skip


def prepare_home(home: Path, db: str = "sqlite") -> Path:
    """DAGSTER_HOME with the project's instance config (storage in PostgreSQL when `db` is
    "postgres") and a workspace naming the definitions file. Raises ValueError for another
    `db`, and for "postgres" when a DAGSTER_PG_* variable is not set."""
    if db not in DATABASES:
        raise ValueError(f"db: {db!r} is not one of {', '.join(DATABASES)}")
    config = yaml.safe_load(INSTANCE_YAML.read_text())
    if db == "postgres":
        missing = [v for v in POSTGRES_VARIABLES.values() if not os.environ.get(v)]
        if missing:
            raise ValueError(
                f"Dagster on PostgreSQL needs {', '.join(missing)} in the environment "
                "(`source .stack/env` after `make stack-up DB=postgres`)"
            )
        config.update(POSTGRES_STORAGE)
    home = home.absolute()
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(
        f"# Written by infra/local/dagster.py from {INSTANCE_YAML.relative_to(ROOT)}.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    (home / "workspace.yaml").write_text(
        "load_from:\n"
        f"  - python_file:\n      relative_path: {DEFINITIONS}\n"
        f"      working_directory: {ROOT}\n      location_name: vit\n"
    )
    return home


def create_storage(home: Path) -> None:
    """Create the instance's storage (runs, events, schedules) and migrate it to the
    installed Dagster's schema (`dagster instance migrate`) before the daemon and the
    webserver start: on a new SQLite DAGSTER_HOME both would otherwise create it at once,
    and their migrations can stamp two alembic heads, after which no process opens it."""
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        instance.upgrade()
        instance.get_runs(limit=1)
        instance.all_instigator_state()


@dataclass
class DagsterServices(ProcessGroupService):
    """`dagster-daemon run` and `dagster-webserver`, each in its own process group."""

    home: Path
    port: int = 0
    env_extra: dict[str, str] = field(default_factory=dict)
    db: str = "sqlite"  # or "postgres": the instance's storage (see prepare_home)
    pgid: int | None = None  # the webserver's
    daemon_pgid: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        return {"DAGSTER_HOME": str(self.home.absolute())}

    def start(self, timeout: float = 180) -> None:
        home = prepare_home(self.home, self.db)
        create_storage(home)
        if self.port:
            require_free(self.port, "Dagster webserver")
        else:
            self.port = free_port()
        env = {**self.env_extra, **self.env(), "PYTHONPATH": str(ROOT)}
        workspace = str(home / "workspace.yaml")
        daemon = launch([find_binary("dagster-daemon", "dagster"), "run", "-w", workspace],
                        home / "daemon.log", env)  # fmt: skip
        self.daemon_pgid = daemon.pid
        try:
            self._run(
                [find_binary("dagster-webserver", "dagster-webserver"), "-h", HOST,
                 "-p", str(self.port), "-w", workspace],
                home / "webserver.log", env, "Dagster webserver",
                lambda: http_ok(f"{self.url}/server_info"), timeout,
            )  # fmt: skip
            wait_until(self.daemon_healthy, timeout, "Dagster daemon", home / "daemon.log", daemon)
        except BaseException:
            self.stop()
            raise
        (home / "services.json").write_text(json.dumps(
            {"port": self.port, "pgid": self.pgid, "daemon_pgid": self.daemon_pgid}))  # fmt: skip

    def daemon_healthy(self) -> bool:
        """Whether every daemon (scheduler, sensors, run queue) has sent a heartbeat."""
        from dagster import DagsterInstance

        with DagsterInstance.from_config(str(self.home.absolute())) as instance:
            statuses = instance.get_daemon_statuses()
            return bool(statuses) and all(s.healthy for s in statuses.values())

    def stop(self) -> None:
        super().stop()
        if self.daemon_pgid:
            kill_group(self.daemon_pgid)
            self.daemon_pgid = None
        (self.home / "services.json").unlink(missing_ok=True)

    @classmethod
    def load(cls, home: Path) -> DagsterServices:
        state = json.loads((home / "services.json").read_text())
        return cls(home, state["port"], pgid=state["pgid"], daemon_pgid=state["daemon_pgid"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DAGSTER_HOME", ".dagster")))
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--db", choices=DATABASES, default="sqlite",
                        help="the instance's storage: SQLite in --home, or the PostgreSQL "
                        "database that the DAGSTER_PG_* variables name")  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "up":
        if (args.home / "services.json").exists():
            print(f"already up: {args.home}/services.json (make pipelines-down first)")
            return 1
        services = DagsterServices(args.home, args.port, db=args.db)
        try:
            prepare_home(args.home, args.db)  # a missing variable: one line, nothing started
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        services.start()
        print(f"Dagster UI {services.url} (DAGSTER_HOME={services.home.absolute()}); "
              "daemon running schedules, sensors and the run queue")  # fmt: skip
    else:
        if not (args.home / "services.json").exists():
            print("not running")
            return 0
        DagsterServices.load(args.home).stop()
        print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
