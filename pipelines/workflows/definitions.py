"""The Dagster definitions: two pipelines of the job scripts, their schedules and the
dataset sensor. Loaded by `dagster-webserver`/`dagster-daemon` (workspace.yaml), by
`python pipelines/workflows/cli.py` and by `dagster dev -f pipelines/workflows/definitions.py`.

- full_pipeline: make_shards -> pretrain -> finetune -> evaluate -> promote
- finetune_pipeline (scheduled fine-tune): dataset_version -> finetune_from_champion
  (one fine-tune, or a Ray Tune search with `search: true`) -> evaluate -> promote

Schedules and the sensor take their parameters from a settings file (VIT_WORKFLOWS_SETTINGS,
default pipelines/workflows/settings.yaml): cron, time zone, whether they start running,
the run config their runs get, the dataset prefix the sensor watches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # loaded as a file by Dagster's code server
    sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402
import yaml  # noqa: E402

from pipelines.workflows import steps  # noqa: E402
from pipelines.workflows.records import RecordIOManager, records_base  # noqa: E402

# Runs of one pipeline carry this tag; dagster.yaml limits each value to one run at a time.
PIPELINE_TAG = "vit/pipeline"
# Steps run one after another in the run's own process: each only starts a job and
# waits, so a process per step (Dagster's default) would only add its start-up, seconds
# per step on a loaded machine.
EXECUTOR = dg.in_process_executor
# Steps' records as JSON in the project's storage, readable by a re-execution anywhere.
# Bound to the jobs themselves, so the CLI's and the demo's runs (which execute a job
# without the Definitions) keep them where the daemon's runs do.
RESOURCES = {"io_manager": RecordIOManager(base=records_base())}


@dg.job(tags={PIPELINE_TAG: "full"}, executor_def=EXECUTOR, resource_defs=RESOURCES,
        description="make_shards -> pretrain -> finetune -> evaluate -> promote, each a job "
        "(a Ray job, or a local process without RAY_ADDRESS)")  # fmt: skip
def full_pipeline():
    dataset = steps.make_shards()
    backbone = steps.pretrain(dataset)
    model = steps.finetune(dataset, backbone)
    evaluation = steps.evaluate(dataset, model)
    steps.promote(dataset, model, evaluation)


@dg.job(tags={PIPELINE_TAG: "finetune"}, executor_def=EXECUTOR, resource_defs=RESOURCES,
        description="a dataset version -> fine-tune from the champion -> evaluate -> promote, "
        "each a job (a Ray job, or a local process without RAY_ADDRESS)")  # fmt: skip
def finetune_pipeline():
    dataset = steps.dataset_version()
    model = steps.finetune_from_champion(dataset)
    evaluation = steps.evaluate(dataset, model)
    steps.promote(dataset, model, evaluation)


def settings() -> dict:
    """The schedules' and sensor's settings (read at every evaluation, so an edit needs
    no restart)."""
    path = Path(os.environ.get("VIT_WORKFLOWS_SETTINGS") or Path(__file__).with_name("settings.yaml"))
    return yaml.safe_load(path.read_text()) or {}


def _status(section: dict, key: str = "running"):
    return dg.DefaultScheduleStatus.RUNNING if section.get(key) else dg.DefaultScheduleStatus.STOPPED


def _schedule(name: str, job, section: dict, extra=None) -> dg.ScheduleDefinition:
    def run_config(context: dg.ScheduleEvaluationContext) -> dict:
        return (settings().get(name) or {}).get("run_config") or {}

    return dg.ScheduleDefinition(
        name=f"{name}_schedule", job=job, cron_schedule=section.get("cron", "0 3 * * *"),
        execution_timezone=section.get("timezone", "UTC"), run_config_fn=run_config,
        default_status=_status(section),
    )  # fmt: skip


_SETTINGS = settings()
schedules = [
    _schedule("full", full_pipeline, _SETTINGS.get("full") or {}),
    _schedule("finetune", finetune_pipeline, _SETTINGS.get("finetune") or {}),
]


def dataset_versions(prefix: str) -> list[str]:
    """The finished datasets right under `prefix` (`<prefix>/<name>/index.json`; make_shards
    writes index.json last, so a dataset being written is not seen)."""
    from vit_core import storage

    base = prefix.rstrip("/") + "/"
    found = []
    for uri in storage.list_files(base):
        rest = uri[len(base):] if uri.startswith(base) else None
        if rest and rest.count("/") == 1 and rest.endswith("/index.json"):
            found.append(base + rest[: -len("/index.json")])
    return sorted(found)


@dg.sensor(job=finetune_pipeline, minimum_interval_seconds=int(
    (_SETTINGS.get("sensor") or {}).get("interval_seconds", 60)),
    default_status=dg.DefaultSensorStatus.RUNNING if (_SETTINGS.get("sensor") or {}).get("running")
    else dg.DefaultSensorStatus.STOPPED)  # fmt: skip
def new_dataset_sensor(context: dg.SensorEvaluationContext):
    """One fine-tune run per new dataset version under the watched prefix: the run key is
    the dataset's version (the hash in its index.json), so a version already seen starts
    nothing, and a copy of the same bytes elsewhere neither."""
    from vit_core.data import read_index

    section = settings().get("sensor") or {}
    prefix = section.get("watch")
    if not prefix:
        return dg.SkipReason("no sensor.watch prefix in the settings")
    locations = dataset_versions(prefix)
    if not locations:
        return dg.SkipReason(f"no finished dataset under {prefix}")
    base = (settings().get("finetune") or {}).get("run_config") or {}
    for location in locations:
        version = read_index(location).version
        ops = {**(base.get("ops") or {}), "dataset_version": {"config": {"location": location}}}
        yield dg.RunRequest(run_key=version, run_config={**base, "ops": ops},
                            tags={"vit/dataset": location, "vit/dataset_version": version})  # fmt: skip


defs = dg.Definitions(
    jobs=[full_pipeline, finetune_pipeline], schedules=schedules, sensors=[new_dataset_sensor],
)
