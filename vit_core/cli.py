"""What every job script shares: config arguments, Ray start-up, and turning the
errors a user can cause into one line instead of a traceback."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from vit_core import storage
from vit_core.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    dump_yaml,
)

# The embedded default's dataset is made from scikit-learn's digits when missing.
EMBEDDED_DIGITS = "data/digits/v1"


def user_errors() -> tuple[type[BaseException], ...]:
    from vit_core.data import DatasetError
    from vit_core.model import CheckpointError
    from vit_core.track.registry import RegistryError
    from vit_core.train.scaling import CapacityError

    return (ConfigError, DatasetError, storage.StorageError, CheckpointError, RegistryError,
            CapacityError)  # fmt: skip


@contextlib.contextmanager
def report_user_errors():
    """An error the user can cause (bad config, missing data, unreadable checkpoint, unknown
    model) becomes one line on stderr instead of a traceback; the block is left, and the
    caller exits with 2."""
    try:
        yield
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)


def report_result(record: dict) -> None:
    """Hand a finished job's result (a small JSON-able record: run ids, versions, URIs,
    metrics) to the Dagster step that launched it, through Dagster Pipes: the step reads it
    from the job's stdout (the job's log on the Ray cluster). Does nothing when the job was
    not launched by Dagster (no DAGSTER_PIPES_CONTEXT), so a hand-submitted job and a
    pipeline step run the same code."""
    import os

    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        pipes.report_custom_message(record)
    sys.stdout.flush()


def ensure_embedded_dataset(location: str) -> None:
    """Make the embedded default's digits (32 px PNGs) when a job asks for them and they
    are missing; jobs at other resolutions resize them as any dataset."""
    if location != EMBEDDED_DIGITS or storage.exists(storage.join(location, "index.json")):
        return
    from vit_core.data import make_digits_shards

    print(f"creating the embedded digits dataset in {location} ...", flush=True)
    make_digits_shards(location)


def outcome_record(outcome) -> dict:
    """A job outcome (a dataclass such as TrainingOutcome) as a JSON-able record."""
    import dataclasses
    import json

    record = dataclasses.asdict(outcome) if dataclasses.is_dataclass(outcome) else dict(outcome)
    return json.loads(json.dumps(record, default=str))


def run_cli(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    config_class: type,
    run: Callable,
    default_preset: str | list[str],
    presets_dir: Path,
) -> int:
    """Parse the config (presets by name from `presets_dir`, which the job script passes
    down: the library never reaches into pipelines/), prepare the embedded default if
    chosen, run the job."""
    add_config_arguments(parser, default_preset)
    args = parser.parse_args(argv)
    outcome = None
    with report_user_errors():
        cfg = config_from_args(config_class, args, presets_dir)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        ensure_embedded_dataset(cfg.data.location)
        outcome = run(cfg)
    if outcome is None:
        return 2
    report_result(outcome_record(outcome))
    print(
        f"done: step {outcome.final_step}, MLflow run {outcome.mlflow_run_id}, "
        f"checkpoint {outcome.checkpoint_uri}"
        + (
            f", registered version {outcome.registered_version}"
            if outcome.registered_version
            else ""
        )
    )
    return 0
