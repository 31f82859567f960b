"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local one, with a readable console.

The console of a job keeps the job's own lines (each trainer's progress line, once, and the
summary); the framework's chatter (Ray Data's execution plans, Ray Train's reports and
checkpoint notices) stays in the session's log files under `<ray temp dir>/session_*/logs`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

# Ray Data's logger, configured from this file (Ray Data's documented RAY_DATA_LOGGING_CONFIG):
# everything still goes to ray-data.log in the session's logs, only warnings to the console.
RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
filters:
  notices: {"()": vit_core.cluster.DropNotices}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: WARNING, filters: [notices]}
loggers:
  ray.data: {level: INFO, handlers: [file, console], propagate: false}
"""


class DropNotices(logging.Filter):
    """Drops Ray Data's warning that progress bars are off (they are, on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_framework_logs() -> None:
    """Ray's `worker_process_setup_hook` for every process of a job (and called on the
    driver): Ray Data logs warnings only to the console; Ray Train leaves `print` alone
    (its print patch would write each progress line twice: to stdout and to its logger).
    A variable the user set already wins."""
    path = Path(tempfile.gettempdir()) / f"vit-ray-data-logging-{os.getuid()}.yaml"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}")
        partial.write_text(RAY_DATA_LOGGING)
        partial.replace(path)  # atomic: processes starting at once never read half a file
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(path))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's placement-group cleaner and Ray's state API find the cluster from
    # RAY_ADDRESS; without it, on a machine running several Ray instances (a local Ray
    # beside a cluster), they stop on "Found multiple active Ray instances" and the
    # placement groups of ended runs are never freed.
    import ray

    if ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # Ray's own deprecation notices about its internal calls: nothing a user can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")


def runtime_env() -> dict:
    """The job-level runtime environment `connect` asks for: the setup hook above, unless
    the job was submitted with a hook of its own (Ray refuses two)."""
    if "worker_process_setup_hook" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""):
        return {}
    return {"worker_process_setup_hook": "vit_core.cluster.quiet_framework_logs"}


def connect() -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), or start Ray here."""
    quiet_framework_logs()  # before ray.data is configured in this process
    import ray
    import ray.data

    # The trainers print their own progress (step, loss, images/s); Ray Data's per-operator
    # bars, repeated for every worker, would drown it. Ray Train hands this context on.
    # Set in a process that Ray already runs too (a search's trial drives its own run).
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_console_logger("ray.data")  # configured already if ray.data was imported before
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # A cluster: set by `ray job submit`, or by the user. The job's code travels with
        # the working dir.
        ray.init(logging_level="WARNING", runtime_env=runtime_env())
        return
    # No cluster: start one here. Logical CPUs are doubled so the data pipeline still
    # gets CPUs while every core also runs a training worker (they share cores).
    cpus = 2 * (os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, logging_level="WARNING", runtime_env=runtime_env())
    print(f"no RAY_ADDRESS: started a local Ray with {cpus} logical CPUs", flush=True)


def quiet_console_logger(name: str) -> None:
    """Raise the console handler of logger `name` ("" for the root logger) to WARNING,
    leaving its file handlers as they are. The handler is found by the name Ray's logging
    configurations give it."""
    for handler in logging.getLogger(name).handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, DropNotices) for f in handler.filters):  # called often
                handler.addFilter(DropNotices())
