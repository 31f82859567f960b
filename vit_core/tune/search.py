"""Hyperparameter search on Ray Tune, every trial a Ray Train run of the training job.

The driver checks the config, opens the search's MLflow run and hands Ray Tune a
function trainable (`run_trial`) that builds the trial's training config and calls
vit_core.train.job.run_training with Ray Tune's TuneReportCallback, as Ray's guide for
Tune with Train V2 does: each trial has its own workers, its checkpoints under the
search's storage, and an MLflow run nested under the search's. A Tune callback on the
driver records each trial's end (completed, stopped early, failed) in its MLflow run and
prints one line for it; at the end the search's pictures are logged and the best
trial's model is registered.

A search submitted again under the same `run_name` is restored from Tune's experiment
state in storage: finished trials are kept, unfinished ones start again and resume
their Ray Train run from its newest checkpoint, under the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from vit_core import cluster, storage
from vit_core.config import ConfigError
from vit_core.track.runs import (
    RUN_NAME_TAG,
    log_config,
    log_png,
    metric_history,
    set_tracking,
    start_or_resume_run,
    tracking_uri,
)
from vit_core.train.checkpoint import latest_stored_checkpoint
from vit_core.train.config import TrainConfig
from vit_core.train.job import (
    CheckedInputs,
    TrainingOutcome,
    check_inputs,
    mark_run_on_exit,
    redact,
    register,
    run_training,
)
from vit_core.tune.config import (
    Dimension,
    SearchConfig,
    TuneSection,
    dimensions,
    grid_size,
    param_space,
    train_config,
    trial_config,
)

STATE_TAG = "vit.tune.state"  # completed, stopped early, failed
STEPS_TAG = "vit.tune.steps"  # optimiser steps the trial trained
SEARCH_TAG = "tune_run_id"  # on the registered version: the search's MLflow run
TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes
# Tune saves its experiment state at least this often (seconds), so a driver killed
# between two saves repeats little.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")
# Trials run in the job's directory, as a training job does, so that relative paths in
# the config (the embedded default's data/ and runs/) mean the same (Tune hands this
# variable from the driver to every trial).
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
# A trial stopped by ASHA waits inside `trainer.fit()` and cannot take Tune's stop
# request, so its Ray Train run would hold its workers' CPUs until Tune kills the trial
# (after 600 s by default) and trials started later would wait for them. Killed after
# this many seconds, the trial's process ends the Train controller it owns, and Ray
# Train releases the workers and their placement group.
os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "10")


@dataclass
class SearchPlan:
    """What the driver resolved, handed to every trial."""

    name: str  # the search's run_name
    base: TrainConfig  # the trials' starting config (init_from pinned)
    trials_storage: str  # <storage>/<name>/trials: each trial's Ray Train run
    tracking_uri: str
    search_run_id: str
    total_steps: int  # a trial's step budget


def trial_run_name(plan: SearchPlan, trial_id: str) -> str:
    return f"{plan.name}-{trial_id}"


def run_trial(params: dict, plan: SearchPlan) -> None:
    """Ray Tune's function trainable: one Ray Train run with `params` (dotted config
    keys) put into the search's config. Its reports reach Tune through
    TuneReportCallback; a trial that had already finished (a restored search) reports
    its final metrics from its MLflow run instead of training again."""
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(plan.tracking_uri)
    experiment = client.get_experiment_by_name(plan.base.tracking.experiment)
    for run in client.search_runs(
        [experiment.experiment_id] if experiment else [], max_results=1,
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{trial_run_name(plan, trial_id)}'",
    ):  # fmt: skip
        if run.data.tags.get(STATE_TAG) in ("completed", "stopped early"):
            # Ended under an earlier driver after Tune last saved its state: the ending
            # recorded then stands; the trial reports it instead of training on.
            tune.report({**run.data.metrics, "step": int(run.data.tags.get(STEPS_TAG, 0))})
            return
    cfg = trial_config(plan.base, params)
    cfg.run_name = trial_run_name(plan, trial_id)
    cfg.storage = plan.trials_storage
    cfg.tracking.register = False  # the search registers its best trial only
    outcome = run_training(cfg, parent_run_id=plan.search_run_id,
                           callbacks=(TuneReportCallback(),))  # fmt: skip
    if not outcome.metrics:
        logged = client.get_run(outcome.mlflow_run_id).data.metrics
        tune.report({**logged, "step": outcome.final_step})


def run_search(cfg: SearchConfig) -> TrainingOutcome:
    """Search the space of `cfg.tune` over trials of the training job, then register the
    best trial's model with lineage tags naming the search's and the trial's MLflow runs.
    Raises ConfigError (and the training job's input errors: DatasetError,
    CheckpointError, RegistryError, StorageError) before any trial starts, RuntimeError
    when no trial finished."""
    base = train_config(cfg)
    dimensions(cfg, num_classes=0)  # the space's own faults first, before any I/O
    inputs = check_inputs(base)
    # check_inputs pinned a models:/NAME@ALIAS start to one version: every trial uses it.
    base.model.init_from = inputs.init_weights
    dims = dimensions(cfg, inputs.index.num_classes)
    root = cfg.storage if storage.is_remote(cfg.storage) else os.path.abspath(cfg.storage)
    home = storage.join(root, cfg.run_name)
    uri = tracking_uri()
    client = set_tracking(uri)
    search_run_id, resumed = start_or_resume_run(client, cfg.tracking.experiment, cfg.run_name)
    check_same_search(client, search_run_id, cfg, dims)
    log_config(client, search_run_id, cfg, {
        "tune.space_sha256": space_digest(cfg, dims),
        "tune.grid_size": grid_size(dims),
        "train.total_steps": inputs.plan.total_steps,
        **{f"lineage.{k}": v for k, v in inputs.lineage.items()},
    })  # fmt: skip
    print(f"search {cfg.run_name}: MLflow run {search_run_id} "
          f"({'resumed' if resumed else 'new'}) at {redact(uri)}", flush=True)  # fmt: skip
    plan = SearchPlan(cfg.run_name, base, storage.join(home, "trials"), uri, search_run_id,
                      inputs.plan.total_steps)  # fmt: skip

    cluster.connect()
    concurrency = cfg.tune.max_concurrent_trials or trials_that_fit(base)
    tuner = build_tuner(cfg, dims, plan, home, concurrency)
    print(f"search {cfg.run_name}: {describe(cfg, dims)}; up to {concurrency} trials at once",
          flush=True)  # fmt: skip
    with mark_run_on_exit(client, search_run_id):
        tuner.fit()
        trials = recorded_trials(client, plan, dims, cfg.tune.metric)
        log_search(client, plan, dims, cfg.tune, trials)
        finished = [t for t in trials if t.value is not None and t.state != "failed"]
        if not finished:
            raise RuntimeError(f"search {cfg.run_name}: no trial finished; see the trials' "
                               f"runs in MLflow experiment {cfg.tracking.experiment}")  # fmt: skip
        sign = 1 if cfg.tune.mode == "max" else -1
        best = max(finished, key=lambda t: sign * t.value)
        version, checkpoint = register_best(cfg, client, plan, inputs, best)
    client.set_terminated(search_run_id)
    print(f"search {cfg.run_name}: best trial {best.name} ({format_params(best.params)}): "
          f"{cfg.tune.metric} {best.value:.4f} at step {best.steps}; {len(trials)} trials, "
          f"{sum(t.steps for t in trials)} trial-steps", flush=True)  # fmt: skip
    return TrainingOutcome(search_run_id, checkpoint, best.steps, {cfg.tune.metric: best.value},
                           version)  # fmt: skip


def trials_that_fit(base: TrainConfig) -> int:
    """How many trials the cluster holds at once: each takes its workers' CPUs (and
    GPUs) and the CPUs its Ray Data pipeline keeps (scaling.data_cpus)."""
    import ray

    from vit_core.train.scaling import worker_range

    total = ray.cluster_resources()
    workers = worker_range(base)[1]
    per_trial = workers * base.scaling.cpus_per_worker + base.scaling.data_cpus
    fits = int(total.get("CPU", 0) // per_trial)
    if base.scaling.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // workers))
    return max(1, fits)


def build_tuner(cfg: SearchConfig, dims: list[Dimension], plan: SearchPlan, home: str,
                concurrency: int):  # fmt: skip
    """A new Tuner, or the one saved under `<home>/tune` when this search ran before."""
    from ray import tune

    trainable = tune.with_parameters(run_trial, plan=plan)
    # The trial process only drives its Ray Train run: its workers hold the CPUs. A
    # fraction of a CPU per trial would split the nodes' CPUs so that no whole one is
    # left for Ray Data's read tasks (they would wait forever), so it asks for memory.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    fs, path = storage.pyarrow_filesystem(home)
    if not storage.is_remote(home):
        os.makedirs(path, exist_ok=True)
    experiment = f"{path}/tune"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        print(f"search {cfg.run_name}: restoring its trials from {storage.join(home, 'tune')}",
              flush=True)  # fmt: skip
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                  param_space=param_space(dims), storage_filesystem=fs)  # fmt: skip
    t = cfg.tune
    scheduler = (
        ResumableASHA(plan, t.metric, time_attr="step", max_t=plan.total_steps,
                      grace_period=t.grace_period, reduction_factor=t.reduction_factor)
        if t.scheduler == "asha" else tune.schedulers.FIFOScheduler()
    )  # fmt: skip
    if t.search == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(n_startup_trials=t.tpe_startup_trials, seed=t.seed)
        search_alg = OptunaSearch(sampler=sampler)
        limit = concurrency  # Tune wraps a Searcher in its ConcurrencyLimiter
    else:
        # Tune leaves the limit to a search algorithm given as an instance.
        search_alg = tune.search.BasicVariantGenerator(random_state=t.seed,
                                                       max_concurrent=concurrency)  # fmt: skip
        limit = None
    return tune.Tuner(
        trainable,
        param_space=param_space(dims),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples, scheduler=scheduler,
            search_alg=search_alg, max_concurrent_trials=limit,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=path, storage_filesystem=fs, verbose=0,
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            callbacks=[TrialRecorder(plan, [d.key for d in dims], t.metric)],
        ),
    )  # fmt: skip


class ResumableASHA(ASHAScheduler):
    """Ray Tune's ASHA, whose rungs survive a restored search. Tune saves the trials and
    the search algorithm with an experiment but not the scheduler: restored, ASHA would
    start with empty rungs and compare the remaining trials only with each other. Here
    every trial restored from an earlier driver has its recorded validation results
    (its MLflow run's history of `metric`) fed to the rungs as it is added."""

    def __init__(self, plan: SearchPlan, metric: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.plan, self.history_metric = plan, metric

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not (trial.last_result or {}).get("step"):
            return  # a new trial: nothing recorded yet
        from mlflow import MlflowClient

        client = MlflowClient(self.plan.tracking_uri)
        experiment = client.get_experiment_by_name(self.plan.base.tracking.experiment)
        name = trial_run_name(self.plan, trial.trial_id)
        for run in client.search_runs([experiment.experiment_id],
                                      f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1):  # fmt: skip
            for step, value in metric_history(client, run.info.run_id, self.history_metric):
                super().on_trial_result(tune_controller, trial,
                                        {"step": step, self.history_metric: value})  # fmt: skip


class TrialRecorder(Callback):
    """A Ray Tune callback on the driver: one line per trial start and end, and each
    trial's end recorded on its MLflow run (status FINISHED, KILLED for stopped early,
    FAILED; the tag vit.tune.state; the steps it trained). Holds no state of its own, as
    Tune restores callbacks from its saved experiment."""

    def __init__(self, plan: SearchPlan, keys: list[str], metric: str) -> None:
        self.plan, self.keys, self.metric = plan, keys, metric

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        print(f"trial {trial.trial_id} ({format_params(self.params(trial))}): started",
              flush=True)  # fmt: skip

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        steps = int((trial.last_result or {}).get("step", 0))
        state = "completed" if steps >= self.plan.total_steps else "stopped early"
        self.record(trial, state, steps)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.record(trial, "failed", int((trial.last_result or {}).get("step", 0)))

    def params(self, trial) -> dict:
        return {k: trial.config.get(k) for k in self.keys}

    def record(self, trial, state: str, steps: int) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.plan.tracking_uri)
        name = trial_run_name(self.plan, trial.trial_id)
        value = (trial.last_result or {}).get(self.metric)
        shown = f", {self.metric} {value:.4f}" if isinstance(value, float) else ""
        print(f"trial {trial.trial_id} ({format_params(self.params(trial))}): {state} at step "
              f"{steps}{shown}", flush=True)  # fmt: skip
        for run in client.search_runs(
            [client.get_experiment_by_name(self.plan.base.tracking.experiment).experiment_id],
            filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1,
        ):  # fmt: skip
            client.set_tag(run.info.run_id, STATE_TAG, state)
            client.set_tag(run.info.run_id, STEPS_TAG, str(steps))
            status = {"completed": "FINISHED", "stopped early": "KILLED"}.get(state, "FAILED")
            client.set_terminated(run.info.run_id, status)


@dataclass
class TrialRecord:
    name: str  # the trial's run_name
    run_id: str
    params: dict  # the searched keys' values
    state: str  # completed, stopped early, failed (or running: never ended)
    steps: int  # optimiser steps it trained
    value: float | None  # its last value of the search's metric


def recorded_trials(
    client, plan: SearchPlan, dims: list[Dimension], metric: str
) -> list[TrialRecord]:
    """Every trial of the search as its MLflow run records it."""
    experiment = client.get_experiment_by_name(plan.base.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], max_results=10_000,
        filter_string=f"tags.`mlflow.parentRunId` = '{plan.search_run_id}'",
    )  # fmt: skip
    records = []
    for run in runs:
        tags, data = run.data.tags, run.data
        records.append(TrialRecord(
            name=tags.get(RUN_NAME_TAG, run.info.run_name),
            run_id=run.info.run_id,
            params={d.key: parse_param(data.params.get(d.key)) for d in dims},
            state=tags.get(STATE_TAG, "running"),
            steps=int(tags.get(STEPS_TAG, 0)),
            value=data.metrics.get(metric),
        ))  # fmt: skip
    return sorted(records, key=lambda r: r.name)


def parse_param(text: str | None):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def log_search(client, plan: SearchPlan, dims: list[Dimension], tune_cfg: TuneSection,
               trials: list[TrialRecord]) -> None:  # fmt: skip
    """The search's own run: trial counts, total trial-steps, and two pictures: the final
    metric against each searched hyperparameter, and every trial's learning curve."""
    from mlflow.entities import Metric

    from vit_core.track import plots

    metric = tune_cfg.metric
    counts = {
        "tune/trials": len(trials),
        "tune/completed": sum(t.state == "completed" for t in trials),
        "tune/stopped_early": sum(t.state == "stopped early" for t in trials),
        "tune/failed": sum(t.state == "failed" for t in trials),
        "tune/total_trial_steps": sum(t.steps for t in trials),
        "tune/grid_trial_steps": len(trials) * plan.total_steps,
    }
    finished = [t.value for t in trials if t.value is not None and t.state != "failed"]
    if finished:
        best = max(finished) if tune_cfg.mode == "max" else min(finished)
        counts[f"tune/best_{metric.replace('/', '_')}"] = best
    now = int(time.time() * 1000)
    client.log_batch(plan.search_run_id, metrics=[Metric(k, float(v), now, 0)
                                                  for k, v in counts.items()])  # fmt: skip
    points = [{"params": t.params, "value": t.value, "state": t.state} for t in trials]
    log_keys = {d.key for d in dims if d.kind == "loguniform" or (
        d.kind in ("grid", "choice") and all(isinstance(v, int | float) and v > 0 for v in d.values)
        and max(d.values) / min(d.values) >= 10)}  # fmt: skip
    log_png(client, plan.search_run_id,
            plots.search_png(points, [d.key for d in dims], metric, log_keys), "search.png")  # fmt: skip
    curves = {f"{t.name} ({format_params(t.params)})": metric_history(client, t.run_id, metric)
              for t in trials}  # fmt: skip
    stopped = {f"{t.name} ({format_params(t.params)})" for t in trials if t.state != "completed"}
    log_png(client, plan.search_run_id,
            plots.trial_curves_png(curves, stopped, metric, plan.total_steps), "trial_curves.png")  # fmt: skip


def register_best(cfg: SearchConfig, client, plan: SearchPlan, inputs: CheckedInputs,
                  best: TrialRecord) -> tuple[str | None, str]:  # fmt: skip
    """Register the best trial's newest checkpoint (once: a search submitted again
    reports the version it registered) with lineage tags naming the search's run and the
    trial's run. Returns (version, checkpoint URI)."""
    trial_cfg = trial_config(plan.base, best.params)
    trial_cfg.run_name, trial_cfg.storage = best.name, plan.trials_storage
    trial_cfg.tracking.alias = cfg.tracking.alias or "candidate"
    checkpoint = latest_stored_checkpoint(storage.join(plan.trials_storage, best.name))
    if checkpoint is None:
        raise RuntimeError(f"search {cfg.run_name}: best trial {best.name} left no checkpoint")
    if not cfg.tracking.register:
        return None, checkpoint.uri
    found = client.search_model_versions(
        f"name='{cfg.tracking.registered_model}' and tags.{SEARCH_TAG}='{plan.search_run_id}'"
    )
    if found:
        version = str(max(int(v.version) for v in found))
        print(f"search {cfg.run_name}: already registered as {cfg.tracking.registered_model} "
              f"version {version}", flush=True)  # fmt: skip
        return version, checkpoint.uri
    lineage = {**inputs.lineage, SEARCH_TAG: plan.search_run_id, "tune_trial": best.name}
    metrics = {cfg.tune.metric: best.value} if cfg.tune.metric.startswith("val/") else {}
    version = register(trial_cfg, client, best.run_id, checkpoint.uri,
                       dataclasses.replace(inputs, lineage=lineage), metrics)  # fmt: skip
    return version, checkpoint.uri


def check_same_search(client, run_id: str, cfg: SearchConfig, dims: list[Dimension]) -> None:
    """A search submitted again under its name must search the same space: Tune restores
    the saved one. Raises ConfigError otherwise."""
    logged = client.get_run(run_id).data.params.get("tune.space_sha256")
    if logged and logged != space_digest(cfg, dims):
        raise ConfigError(
            f"run_name {cfg.run_name}: a search of that name ran with another space, search "
            "or scheduler; it would be restored as it was. Use a new run_name"
        )


def space_digest(cfg: SearchConfig, dims: list[Dimension]) -> str:
    t = cfg.tune
    what = [[d.key, d.kind, d.values] for d in dims]
    what += [t.search, t.num_samples, t.metric, t.mode, t.scheduler, t.grace_period,
             t.reduction_factor, t.seed]  # fmt: skip
    if t.search == "tpe":  # kept out of other searches' digests: they do not use it
        what.append(t.tpe_startup_trials)
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]


def describe(cfg: SearchConfig, dims: list[Dimension]) -> str:
    t = cfg.tune
    space = ", ".join(f"{d.key} {d.kind} {d.values}" for d in dims)
    trials = grid_size(dims) * t.num_samples
    scheduler = (f"ASHA on {t.metric} (grace {t.grace_period} steps, reduction "
                 f"{t.reduction_factor:g})" if t.scheduler == "asha" else "every trial to the end")  # fmt: skip
    search = (f"tpe search ({t.tpe_startup_trials} random trials first)" if t.search == "tpe"
              else f"{t.search} search")  # fmt: skip
    return f"{search} over {space}, {trials} trials, {scheduler}"


def format_params(params: dict) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )
