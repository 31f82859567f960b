"""The pipeline steps (Dagster ops). Each compute step runs one job script, as a Ray job
on the cluster at RAY_ADDRESS or as a local process on the embedded default
(launch.run_job), and passes on a small record (URIs, run ids, versions, metrics); none
holds training logic. Every step takes `timeout_s`, a time limit for its job.

Run config: every step takes the job's own parameters (`config`: presets as the job's
--config, `overrides`: KEY=VALUE as its --set). The first step of a pipeline checks every
step's parameters with the jobs' typed configs (vit_core.config.load_config) before any
work, so a misspelt key stops the run in its first second with one line naming it.
"""

# No `from __future__ import annotations`: Dagster reads the ops' config annotations as types.

from pathlib import Path

import dagster as dg
from pydantic import Field

from pipelines.workflows.launch import run_job

PRESETS = Path(__file__).resolve().parents[1] / "configs"
# The jobs' default presets (pipelines/pretrain.py, finetune.py, tune.py).
DEFAULT_PRESETS = {
    "pretrain": ["digits_tiny"],
    "finetune": ["digits_finetune"],
    "tune": ["digits_finetune", "digits_tune"],
}


class Step(dg.Config):
    """What every step with a job takes."""

    timeout_s: float | None = Field(None, gt=0, description="time limit of the step's job "
                                    "in seconds: past it the job is stopped and the step "
                                    "fails; none: no limit")  # fmt: skip


class TrainStep(Step):
    """A training job's parameters, as on its command line."""

    config: list[str] = Field(default_factory=list, description="presets (--config); "
                              "empty: the job's default")  # fmt: skip
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE (--set)")


class FinetuneStep(TrainStep):
    search: bool = Field(False, description="run a Ray Tune search (pipelines/tune.py) "
                         "instead of one fine-tune; its best trial becomes the candidate")  # fmt: skip
    base: str = Field("", description="starting weights when the model has no champion "
                      "yet (scheduled fine-tune); empty: the preset's model.init_from")  # fmt: skip


class ShardsStep(Step):
    source: str = Field("digits", description="make_shards.py --source")
    out: str = Field(description="dataset location, e.g. s3://vit/datasets/digits/v1")
    args: list[str] = Field(default_factory=list, description="more make_shards.py arguments")


class DatasetStep(dg.Config):
    location: str = Field(description="the dataset version to fine-tune on (has index.json)")


class EvaluateStep(Step):
    split: str = "val"
    actors: int = 1


class PromoteStep(Step):
    split: str = "val"
    margin: float = 0.0
    alpha: float = 0.05


def _presets(step: TrainStep, job: str) -> list[Path]:
    from vit_core.config import resolve_preset

    return [resolve_preset(name, PRESETS) for name in (step.config or DEFAULT_PRESETS[job])]


def resolve_train_config(step: TrainStep, job: str, forced: list[str] = ()):
    """The job's typed config (TrainConfig, or SearchConfig for tune) from the step's
    presets and overrides, then `forced` (values the pipeline sets: data location, run
    name, starting weights). Raises vit_core.config.ConfigError naming the key."""
    from vit_core.config import load_config

    if job == "tune":
        from vit_core.tune.config import SearchConfig as cls
    else:
        from vit_core.train.config import TrainConfig as cls
    return load_config(cls, _presets(step, job), [*step.overrides, *forced])


# Each step's config class, to check the whole run config in the first step.
STEP_CONFIGS = {
    "make_shards": ShardsStep, "dataset_version": DatasetStep, "pretrain": TrainStep,
    "finetune": FinetuneStep, "finetune_from_champion": FinetuneStep,
    "evaluate": EvaluateStep, "promote": PromoteStep,
}  # fmt: skip


def check_run_config(context: dg.OpExecutionContext) -> None:
    """Check every step's parameters in this run's config before any step works: each
    step's own fields (a time limit must be positive), then the training steps' job
    configs. Raises dagster.Failure with one line naming the step and the key."""
    from pydantic import ValidationError

    from vit_core.config import ConfigError

    ops = (context.run_config or {}).get("ops", {})
    for name, cls in STEP_CONFIGS.items():
        raw = (ops.get(name) or {}).get("config")
        try:
            if raw is not None:
                cls(**raw)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise dg.Failure(description=f"run config ops.{name}.config: {problems}") from None
    for name, job in (("pretrain", "pretrain"), ("finetune", "finetune"),
                      ("finetune_from_champion", "finetune")):  # fmt: skip
        raw = (ops.get(name) or {}).get("config")
        if raw is None:
            continue
        step = FinetuneStep(**raw) if job == "finetune" else TrainStep(**raw)
        which = "tune" if getattr(step, "search", False) else job
        try:
            resolve_train_config(step, which)
        except ConfigError as err:
            raise dg.Failure(description=f"run config ops.{name}: {err}") from None


def _sets(*overrides: str) -> list[str]:
    return [part for o in overrides for part in ("--set", o)]


def _given(step: TrainStep, key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in step.overrides)


def run_name_for(context: dg.OpExecutionContext, step: str) -> str:
    """A training run's name from the pipeline run's root id: a re-execution of the run
    trains under the same name, so the job resumes from the run's newest checkpoint."""
    root = context.run.root_run_id or context.run_id
    return f"{step}-{root[:13]}"


def train(context: dg.OpExecutionContext, step: TrainStep, job: str, forced: list[str]) -> dict:
    """Submit a training job (pretrain, finetune or tune) and return its record: the
    registered model's URI, name and version, the MLflow run, checkpoint and metrics."""
    if not _given(step, "run_name"):
        forced = [*forced, f"run_name={run_name_for(context, context.op_handle.name)}"]
    cfg = resolve_train_config(step, job, forced)  # validated again, with what was filled in
    args = [a for name in (step.config or DEFAULT_PRESETS[job]) for a in ("--config", name)]
    args += _sets(*step.overrides, *forced)
    result = run_job(context, f"{job}.py", args, step.timeout_s)
    record = dict(result.record)
    name, version = cfg.tracking.registered_model, record.get("registered_version")
    record.update(run_name=cfg.run_name, registered_model=name, job_id=result.job_id,
                  model_uri=f"models:/{name}/{version}" if version else None)  # fmt: skip
    context.add_output_metadata({"model_uri": str(record["model_uri"]), "run_name": cfg.run_name,
                                 "mlflow_run_id": str(record.get("mlflow_run_id"))})  # fmt: skip
    return record


@dg.op
def make_shards(context: dg.OpExecutionContext, config: ShardsStep) -> dict:
    """pipelines/make_shards.py as a job; a location that already holds a finished
    dataset (index.json, written last) is used as it is: a dataset version is immutable."""
    check_run_config(context)
    from vit_core import storage
    from vit_core.data import read_index

    if storage.exists(storage.join(config.out, "index.json")):
        index = read_index(config.out)
        context.log.info(f"{config.out} is a finished dataset (version {index.version}): using it")
        return {"location": config.out, "version": index.version, "made": False}
    args = ["--source", config.source, "--out", config.out, "--quiet", *config.args]
    result = run_job(context, "make_shards.py", args, config.timeout_s)
    return {**result.record, "location": config.out, "made": True}


@dg.op
def dataset_version(context: dg.OpExecutionContext, config: DatasetStep) -> dict:
    """The dataset version a scheduled or sensed fine-tune trains on (read on the
    orchestrator: one small index.json)."""
    check_run_config(context)
    from vit_core.data import read_index

    index = read_index(config.location)
    context.add_output_metadata({"dataset_version": index.version})
    return {"location": config.location, "version": index.version}


@dg.op
def pretrain(context: dg.OpExecutionContext, config: TrainStep, dataset: dict) -> dict:
    return train(context, config, "pretrain", [f"data.location={dataset['location']}"])


@dg.op
def finetune(context: dg.OpExecutionContext, config: FinetuneStep, dataset: dict,
             backbone: dict) -> dict:  # fmt: skip
    """Fine-tune from the pretrained backbone's exact version."""
    forced = [f"data.location={dataset['location']}"]
    if not _given(config, "model.init_from"):
        forced.append(f"model.init_from={backbone['model_uri']}")
    return train(context, config, "tune" if config.search else "finetune", forced)


@dg.op
def finetune_from_champion(context: dg.OpExecutionContext, config: FinetuneStep,
                           dataset: dict) -> dict:  # fmt: skip
    """Fine-tune the registered model's champion on a new dataset version, or `base` when
    it has no champion yet."""
    from vit_core.track.runs import tracking_uri

    job = "tune" if config.search else "finetune"
    name = resolve_train_config(config, job).tracking.registered_model
    forced = [f"data.location={dataset['location']}"]
    if not _given(config, "model.init_from"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient(tracking_uri()).get_model_version_by_alias(name, "champion")
            forced.append(f"model.init_from=models:/{name}@champion")
        except MlflowException:
            if config.base:
                forced.append(f"model.init_from={config.base}")
        context.log.info(f"starting weights: {forced[-1].split('=', 1)[1]}" if len(forced) > 1
                         else "starting weights: the preset's model.init_from")  # fmt: skip
    return train(context, config, job, forced)


@dg.op
def evaluate(context: dg.OpExecutionContext, config: EvaluateStep, dataset: dict,
             model: dict) -> dict:  # fmt: skip
    """pipelines/evaluate.py on the fine-tuned version (logged to MLflow, tagged on it)."""
    args = ["--model", model["model_uri"], "--data", dataset["location"],
            "--split", config.split, "--actors", str(config.actors)]  # fmt: skip
    record = run_job(context, "evaluate.py", args, config.timeout_s).record
    context.add_output_metadata({f"eval_{k}": float(v) for k, v in record["metrics"].items()})
    return record


@dg.op
def promote(context: dg.OpExecutionContext, config: PromoteStep, dataset: dict,
            model: dict, evaluation: dict) -> dict:  # fmt: skip
    """pipelines/promote.py: `champion` moves only if the candidate wins; a refusal is a
    finished step with the decision recorded (here and on the model versions)."""
    args = ["--model", model["registered_model"], "--data", dataset["location"],
            "--split", config.split, "--margin", str(config.margin), "--alpha", str(config.alpha)]  # fmt: skip
    record = run_job(context, "promote.py", args, config.timeout_s).record
    decision = record.get("decision") or {}
    # No decision: the candidate already is the champion (promote.py says so).
    reason = decision.get("reason") or "nothing to decide: the candidate is the champion"
    context.add_output_metadata({
        "promoted": bool(decision.get("promote")), "reason": str(reason),
        "candidate_version": str(decision.get("candidate_version")),
        "champion_version": str(decision.get("champion_version")),
    })  # fmt: skip
    return record
