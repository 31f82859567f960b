"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local one."""

from __future__ import annotations

import os


def connect() -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), or start Ray here."""
    import ray
    import ray.data

    # The trainers print their own progress (step, loss, images/s); Ray Data's per-operator
    # bars, repeated for every worker, would drown it. Ray Train hands this context on.
    # Set in a process that Ray already runs too (a search's trial drives its own run).
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # A cluster: set by `ray job submit`, or by the user. The job's code travels with
        # the working dir.
        ray.init(logging_level="WARNING")
        return
    # No cluster: start one here. Logical CPUs are doubled so the data pipeline still
    # gets CPUs while every core also runs a training worker (they share cores).
    cpus = 2 * (os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, logging_level="WARNING")
    print(f"no RAY_ADDRESS: started a local Ray with {cpus} logical CPUs", flush=True)
