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


def scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    s = cfg.scaling
    return ray.train.ScalingConfig(
        num_workers=s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker=worker_resources(cfg),
        placement_strategy=s.placement_strategy,
    )


def failure_config(cfg: TrainConfig) -> ray.train.FailureConfig:
    """Worker failures are retried `scaling.max_failures` times; a worker group that
    cannot be placed within `scaling.wait_for_workers_s` is not retried."""
    return ray.train.FailureConfig(max_failures=cfg.scaling.max_failures,
                                   controller_failure_limit=0)  # fmt: skip


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1.0
    return resources


@contextmanager
def placement_limits(cfg: TrainConfig):
    """Around `trainer.fit()`: one placement attempt of `scaling.wait_for_workers_s`
    (the variable is restored afterwards), and its timeout as one CapacityError line."""
    previous = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{cfg.scaling.wait_for_workers_s:g}"
    try:
        yield
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
        if type(err.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        n = cfg.scaling.num_workers
        raise CapacityError(
            f"could not place {n} worker{'s' if n != 1 else ''} x "
            f"{format_resources(worker_resources(cfg))} ({cfg.scaling.placement_strategy}) "
            f"within {cfg.scaling.wait_for_workers_s:g} s (scaling.wait_for_workers_s): "
            f"{describe_cluster()}"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = previous


def check_scaling(cfg: TrainConfig) -> None:
    """The scaling section's numbers, on the driver before anything starts."""
    s = cfg.scaling
    if s.num_workers < 1:
        raise ConfigError(f"scaling.num_workers: {s.num_workers} (at least 1)")
    if s.wait_for_workers_s <= 0:
        raise ConfigError(f"scaling.wait_for_workers_s: {s.wait_for_workers_s:g} (seconds, > 0)")
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
