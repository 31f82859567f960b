"""How many trainers a run places, how long it waits for them, and the CPUs it leaves to
Ray Data.

Waiting: Ray Train gives each attempt to place the worker group
RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S and, by default, retries without end, so a run
whose workers cannot be placed (more than the cluster has, or a node lost for good)
waits forever in silence. Here one attempt lasts `scaling.wait_for_workers_s` and is not
retried (FailureConfig.controller_failure_limit=0), and the timeout becomes one line,
`CapacityError`, naming what was asked for and what the cluster has.

Data: Ray Data reads and decodes in tasks that need a CPU of their own; trainers holding
every CPU of the cluster leave them pending forever. The driver refuses such a run before
it starts, and every (re)started worker group checks again, so a run that lost a node
stops with one line instead of hanging.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from contextlib import contextmanager

import ray
import ray.train

from vit_core.config import ConfigError
from vit_core.train.config import TrainConfig

# Ray Train's own setting for one placement attempt; the controller reads it from the
# driver's environment when fit() starts.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class CapacityError(RuntimeError):
    """The cluster cannot give the run its trainers (within the configured wait) or would
    leave no CPU to its data pipeline; the message is one line naming both sides."""


def worker_range(cfg: TrainConfig) -> tuple[int, int]:
    """scaling.num_workers as (min, max): a count N is (N, N), `MIN..MAX` a range (Ray
    Train's elastic mode). Raises ConfigError naming the value."""
    value = cfg.scaling.num_workers
    if isinstance(value, int):
        low = high = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", value)
        if not match:
            raise ConfigError(f"scaling.num_workers: {value!r} (a count, or MIN..MAX such as 2..8)")
        low, high = int(match[1]), int(match[2])
    if low < 1 or high < low:
        raise ConfigError(f"scaling.num_workers: {value!r} (at least 1, and MIN <= MAX)")
    return low, high


def format_workers(cfg: TrainConfig) -> str:
    """`2` or `1..2`, for a message."""
    low, high = worker_range(cfg)
    return str(low) if low == high else f"{low}..{high}"


def scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    s = cfg.scaling
    low, high = worker_range(cfg)
    return ray.train.ScalingConfig(
        num_workers=low if low == high else (low, high),
        use_gpu=s.use_gpu,
        resources_per_worker=worker_resources(cfg),
        placement_strategy=s.placement_strategy,
        elastic_resize_monitor_interval_s=s.elastic_resize_monitor_interval_s,
    )


def failure_config(cfg: TrainConfig) -> ray.train.FailureConfig:
    """Worker failures are retried `scaling.max_failures` times; a worker group that
    cannot be placed within `scaling.wait_for_workers_s` is not retried, except in an
    elastic run: there Ray sizes a restarted group from a view of the nodes refreshed
    every 20 s (Ray Data's AutoscalingCoordinator), so the first attempt after a node is
    lost may still count it, and a second attempt, sized afresh, is allowed."""
    low, high = worker_range(cfg)
    return ray.train.FailureConfig(max_failures=cfg.scaling.max_failures,
                                   controller_failure_limit=0 if low == high else 2)  # fmt: skip


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1.0
    return resources


@contextmanager
def placement_limits(cfg: TrainConfig):
    """Around `trainer.fit()`: one placement attempt of `scaling.wait_for_workers_s`
    (the variable is restored afterwards), and its timeout as one CapacityError line;
    for an elastic run, the same limit on a cluster that holds fewer than MIN workers."""
    previous = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{cfg.scaling.wait_for_workers_s:g}"
    watch = BelowMinimumWatch(cfg)
    try:
        with watch:
            yield
        if watch.fired:  # the aborted run may also end without an error
            raise CapacityError(watch.message())
    except ray.train.WorkerGroupError as err:
        # A restarted worker group refused by check_data_cpus, once Ray's retries are spent.
        for failure in err.worker_failures.values():
            cause = getattr(failure, "cause", failure)
            if isinstance(cause, CapacityError):
                raise CapacityError(str(cause).splitlines()[0]) from None
        raise
    except ray.train.ControllerError as err:
        # The type is Ray Train's internal WorkerGroupStartupTimeoutError; it has no public
        # name, so it is matched by name and anything else passes through unchanged.
        if watch.fired:
            raise CapacityError(watch.message()) from None
        if type(err.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        n = format_workers(cfg)
        raise CapacityError(
            f"could not place {n} worker{'s' if n != '1' else ''} x "
            f"{format_resources(worker_resources(cfg))} ({cfg.scaling.placement_strategy}) "
            f"within {cfg.scaling.wait_for_workers_s:g} s (scaling.wait_for_workers_s): "
            f"{describe_cluster()}"
        ) from None
    except Exception:
        if watch.fired:
            raise CapacityError(watch.message()) from None
        raise
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = previous


class BelowMinimumWatch:
    """For an elastic run (scaling.num_workers MIN..MAX), from the driver: Ray Train's
    ElasticScalingPolicy starts no worker group while the live nodes hold fewer than MIN
    workers, and waits so without end. When they have held fewer than MIN for
    `scaling.wait_for_workers_s`, this aborts the run as Ctrl-C does (Ray Train's SIGINT
    handler stops the controller) and sets `fired`. Workers are counted as Ray counts
    them: per live node, how many workers' resources fit in its total resources."""

    def __init__(self, cfg: TrainConfig, interval_s: float = 2.0) -> None:
        self.cfg, self.interval_s = cfg, interval_s
        self.low = worker_range(cfg)[0]
        self.fired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        low, high = worker_range(self.cfg)
        # Only the main thread can take the SIGINT; a search's trial runs in another.
        if low != high and threading.current_thread() is threading.main_thread():
            self._thread = threading.Thread(target=self._watch, name="below-min", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return False

    def _watch(self) -> None:
        since = None
        while not self._stop.wait(self.interval_s):
            try:
                fit = workers_that_fit(self.cfg)
            except Exception:  # the GCS is busy or restarting: ask again
                continue
            if fit >= self.low:
                since = None
                continue
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since >= self.cfg.scaling.wait_for_workers_s:
                self.fired = True
                os.kill(os.getpid(), signal.SIGINT)
                return

    def message(self) -> str:
        return (
            f"fewer than {self.low} worker{'s' if self.low != 1 else ''} x "
            f"{format_resources(worker_resources(self.cfg))} fit the cluster for "
            f"{self.cfg.scaling.wait_for_workers_s:g} s (scaling.wait_for_workers_s, "
            f"scaling.num_workers={format_workers(self.cfg)}): {describe_cluster()}"
        )


def workers_that_fit(cfg: TrainConfig) -> int:
    """How many workers the live nodes hold, as Ray Train's elastic mode counts them:
    per node, the whole workers its total resources fit."""
    need = {k: v for k, v in worker_resources(cfg).items() if v > 0}
    if not need:
        return worker_range(cfg)[1]
    return sum(
        int(min(n["Resources"].get(k, 0.0) // v for k, v in need.items()))
        for n in ray.nodes()
        if n.get("Alive")
    )


def check_scaling(cfg: TrainConfig) -> None:
    """The scaling section's numbers, on the driver before anything starts."""
    s = cfg.scaling
    worker_range(cfg)
    if s.wait_for_workers_s <= 0:
        raise ConfigError(f"scaling.wait_for_workers_s: {s.wait_for_workers_s:g} (seconds, > 0)")
    if s.elastic_resize_monitor_interval_s < 0:
        raise ConfigError("scaling.elastic_resize_monitor_interval_s: "
                          f"{s.elastic_resize_monitor_interval_s:g} (seconds, >= 0)")
    if s.data_cpus < 0 or s.cpus_per_worker < 0:
        raise ConfigError(f"scaling: data_cpus {s.data_cpus:g} and cpus_per_worker "
                          f"{s.cpus_per_worker:g} cannot be negative")  # fmt: skip


def check_data_cpus(cfg: TrainConfig, num_workers: int) -> None:
    """Raise CapacityError when `num_workers` trainers would leave the cluster fewer than
    `scaling.data_cpus` CPUs for Ray Data. Needs a Ray connection (driver or worker)."""
    total = ray.cluster_resources().get("CPU", 0.0)
    trainers = num_workers * cfg.scaling.cpus_per_worker
    if total - trainers < cfg.scaling.data_cpus:
        raise CapacityError(
            f"{num_workers} trainers x {cfg.scaling.cpus_per_worker:g} CPU would leave "
            f"{max(total - trainers, 0):g} of the cluster's {total:g} CPUs to Ray Data's read "
            f"and decode tasks, fewer than scaling.data_cpus={cfg.scaling.data_cpus:g}: "
            "lower scaling.num_workers or scaling.cpus_per_worker, or add nodes"
        )


def describe_cluster() -> str:
    """The alive nodes' resources in one phrase: `the cluster has 2 nodes with CPU 2, 2
    (CPU 3 free)`."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = ", ".join(f"{n['Resources'].get('CPU', 0):g}" for n in nodes)
    free = ray.available_resources()
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    gpu_text = f", GPU {gpus:g} in all ({free.get('GPU', 0):g} free)" if gpus else ""
    return (
        f"the cluster has {len(nodes)} node{'s' if len(nodes) != 1 else ''} with CPU "
        f"{per_node or 0} ({free.get('CPU', 0):g} free){gpu_text}"
    )


def format_resources(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"
