"""The driver side of a training job (pretraining and fine-tuning alike): check every
input before any worker starts, open the MLflow run, hand the per-worker loop to Ray
Train, then register the result in the model registry."""

from __future__ import annotations

import hashlib
import platform
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from vit_core import cluster, storage
from vit_core.config import ConfigError, dump_yaml
from vit_core.data import DataConfig, DatasetIndex, build_dataset, open_dataset
from vit_core.model import CheckpointError
from vit_core.track.registry import check_model_name, register_model
from vit_core.track.runs import log_config, set_tracking, start_or_resume_run, tracking_uri
from vit_core.train.checkpoint import MODEL_DIR, latest_stored_checkpoint
from vit_core.train.config import TrainConfig
from vit_core.train.loop import WorkerSpec, train_loop_per_worker
from vit_core.train.model_setup import build_model, fetch_weights, parallel_strategy
from vit_core.train.process_group import NodeAddressTorchConfig
from vit_core.train.scaling import (
    check_data_cpus,
    check_scaling,
    failure_config,
    format_workers,
    placement_limits,
    scaling_config,
    worker_range,
)
from vit_core.train.step import BatchPlan

# Run names become storage prefixes and MLflow tags: no path separators or dot-dot.
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class TrainingOutcome:
    mlflow_run_id: str
    checkpoint_uri: str
    final_step: int
    metrics: dict
    registered_version: str | None


@dataclass
class CheckedInputs:
    """What the driver resolved: the dataset's index, the step budget, the starting
    weights pinned to one version, and their lineage for the registry."""

    index: DatasetIndex
    plan: BatchPlan
    init_weights: str | None
    lineage: dict[str, str]


def run_location(cfg: TrainConfig) -> str:
    """Where the run keeps its checkpoints and best model: <storage>/<run_name>."""
    root = cfg.storage if storage.is_remote(cfg.storage) else str(Path(cfg.storage).absolute())
    return storage.join(root, cfg.run_name)


def check_inputs(cfg: TrainConfig) -> CheckedInputs:
    """Everything that can be checked before a worker starts, each fault one line naming
    what the user typed: run name, registered model name, model config against the image
    size, the dataset, and the starting weights' format and shapes. Raises ConfigError,
    DatasetError, CheckpointError, RegistryError, StorageError."""
    if not _RUN_NAME.match(cfg.run_name):
        raise ConfigError(
            f"run_name {cfg.run_name!r}: use letters, digits, '.', '_' and '-' (it names a "
            "storage prefix and an MLflow tag)"
        )
    check_scaling(cfg)
    if cfg.tracking.register:
        check_model_name(cfg.tracking.registered_model)
    if parallel_strategy(cfg) == "fsdp" and cfg.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay: an EMA copy of the weights is not supported with FSDP")
    if cfg.data.image_size != cfg.model.img_size:
        raise ConfigError(
            f"data.image_size {cfg.data.image_size} differs from model.img_size "
            f"{cfg.model.img_size}: the model is fed the images the data section makes"
        )
    index = open_dataset(cfg.data.location)
    init_weights, lineage = resolve_init(cfg.model.init_from)
    check_model(cfg, index.num_classes, init_weights)
    for key, split in (("train_split", cfg.data.train_split), ("val_split", cfg.data.val_split)):
        if split not in index.splits:
            raise ConfigError(
                f"data.{key}: dataset {cfg.data.location} has no split {split!r} (it has "
                f"{', '.join(sorted(index.splits))})"
            )
    # The step budget and schedule are those of the largest worker group; a smaller one
    # (an elastic run on fewer nodes) accumulates more micro-batches to the same batch.
    plan = BatchPlan.of(cfg, index.num_samples(cfg.data.train_split), worker_range(cfg)[1])
    return CheckedInputs(index, plan, init_weights, lineage)


def resolve_init(init_from: str | None) -> tuple[str | None, dict[str, str]]:
    """models:/NAME@ALIAS pinned to models:/NAME/VERSION (every worker and restart loads
    the same version even if the alias moves), with lineage tags."""
    if init_from is None:
        return None, {}
    if init_from.startswith("models:/"):
        from vit_core.track.registry import pin

        pinned, mv = pin(init_from, set_tracking(tracking_uri()))
        return pinned, {"base_model": mv.name, "base_model_version": str(mv.version)}
    return init_from, {"base_weights": init_from}


def check_model(cfg: TrainConfig, num_classes: int, init_weights: str | None) -> None:
    """Build the model once on the meta device (no memory for weights) from the starting
    checkpoint: a config the image size does not fit, or weights that cannot be read
    safely or do not fit, fail here instead of in every worker."""
    weights = fetch_weights(init_weights)
    try:
        with torch.device("meta"):
            build_model(cfg.model, num_classes, weights)
    except CheckpointError as err:
        # Named as the user typed it, not by the local copy of a downloaded file.
        message = str(err).replace(str(weights), cfg.model.init_from or "")
        if cfg.model.init_from not in message:
            message = f"{cfg.model.init_from}: {message}"
        raise CheckpointError(f"model.init_from: {message}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None


def config_digest(cfg: TrainConfig) -> str:
    return hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()[:16]


def run_training(
    cfg: TrainConfig, parent_run_id: str | None = None, callbacks: tuple = ()
) -> TrainingOutcome:
    """Train (or go on training) the run `cfg.run_name`, then register its model. A run
    that already reached its step budget is not trained again: its registered version is
    reported (or registered, if it never was).

    A search's trial (vit_core.tune) passes its search's MLflow run as `parent_run_id`
    (the trial's run is nested under it) and Ray Train callbacks, such as Ray Tune's
    TuneReportCallback, that see every report."""
    inputs = check_inputs(cfg)
    index, plan = inputs.index, inputs.plan
    location = run_location(cfg)
    uri = tracking_uri()
    client = set_tracking(uri)
    run_id, resumed = start_or_resume_run(client, cfg.tracking.experiment, cfg.run_name,
                                          parent_run_id)  # fmt: skip
    print(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {redact(uri)}")
    latest = latest_stored_checkpoint(location)
    if latest is not None and latest.step >= plan.total_steps:
        return finished_run(cfg, client, run_id, latest, inputs)
    cluster.connect()
    if latest is not None:
        print(f"resuming run {cfg.run_name} from step {latest.step} ({latest.uri})", flush=True)
    log_config(client, run_id, cfg, {
        "version.ray": ray.__version__,
        "version.torch": torch.__version__,
        "version.python": platform.python_version(),
        "cluster.num_workers": format_workers(cfg),
        "cluster.num_gpus": worker_range(cfg)[1] if cfg.scaling.use_gpu else 0,
        "data.num_classes": index.num_classes,
        "data.num_train": index.num_samples(cfg.data.train_split),
        "train.total_steps": plan.total_steps,
        **{f"lineage.{k}": v for k, v in inputs.lineage.items()},
    })  # fmt: skip
    spec = WorkerSpec(
        cfg=cfg,
        num_classes=index.num_classes,
        class_names=index.class_names,
        num_train=index.num_samples(cfg.data.train_split),
        total_steps=plan.total_steps,
        run_location=location,
        init_weights=inputs.init_weights,
        tracking_uri=uri,
        mlflow_run_id=run_id,
    )
    fs, path = storage.pyarrow_filesystem(cfg.storage)
    if not storage.is_remote(cfg.storage):
        Path(path).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        # The process group's store listens on the node's address, not on every interface.
        torch_config=NodeAddressTorchConfig(),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=failure_config(cfg),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            callbacks=list(callbacks),
            # Ray Train's reports, checkpoint notices and the tracebacks of failures it
            # handles (a lost worker, a group that cannot be placed) go to its log files,
            # not the console: the job says what happened in its own lines ("resumed
            # from ...", one "error: ..." line) and a failure it cannot handle reaches the
            # driver as an exception that carries the worker's traceback.
            logging_config=ray.train.LoggingConfig(log_level="CRITICAL"),
        ),
        dataset_config=ingest_config(cfg.data),
        datasets={
            # Named as the workers ask for them, whatever the dataset calls its splits.
            "train": build_dataset(cfg.data, cfg.data.train_split, train=True, index=index),
            "val": build_dataset(cfg.data, cfg.data.val_split, train=False, index=index),
        },
    )
    with mark_run_on_exit(client, run_id), placement_limits(cfg):
        check_data_cpus(cfg, worker_range(cfg)[0])
        result = trainer.fit()
    latest = latest_stored_checkpoint(location)
    if latest is None:
        raise RuntimeError(f"training run {cfg.run_name} finished without a checkpoint")
    metrics = dict(result.metrics or {})
    version = register(cfg, client, run_id, latest.uri, inputs, metrics)
    client.set_terminated(run_id)
    return TrainingOutcome(run_id, latest.uri, latest.step, metrics, version)


def ingest_config(data: DataConfig) -> ray.train.DataConfig:
    """Ray Train's DataConfig for a job's datasets: Ray's default ingest options, with
    blocks in read order when data.preserve_order (every worker gets the same batches in
    the same order on every run)."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = data.preserve_order
    return ray.train.DataConfig(execution_options=options)


def finished_run(cfg, client, run_id: str, latest, inputs: CheckedInputs) -> TrainingOutcome:
    """A run submitted again after it reached its step budget: nothing is trained; its
    registered version is reported, or its final checkpoint registered if it never was.
    To train further, raise train.epochs or train.steps; to train anew, use a new run_name."""
    found = client.search_model_versions(
        f"name='{cfg.tracking.registered_model}' and tags.run_name='{cfg.run_name}'"
    ) if cfg.tracking.register else []  # fmt: skip
    if found:
        version = str(max(int(v.version) for v in found))
        print(
            f"run {cfg.run_name} already finished at step {latest.step} and is registered as "
            f"{cfg.tracking.registered_model} version {version}; nothing to do (raise "
            "train.epochs or train.steps to extend it, or use a new run_name to retrain)",
            flush=True,
        )
    else:
        print(f"run {cfg.run_name} already finished at step {latest.step}", flush=True)
        version = register(cfg, client, run_id, latest.uri, inputs, {})
    client.set_terminated(run_id)
    return TrainingOutcome(run_id, latest.uri, latest.step, {}, version)


def register(cfg, client, run_id: str, checkpoint_uri: str, inputs: CheckedInputs,
             metrics: dict) -> str | None:  # fmt: skip
    """Register the checkpoint's model with its lineage and final validation metrics."""
    if not cfg.tracking.register:
        return None
    model_dir = storage.materialize(storage.join(checkpoint_uri, MODEL_DIR))
    tags = {
        "dataset": cfg.data.location,
        "dataset_version": inputs.index.version,
        "checkpoint_uri": checkpoint_uri,
        "best_model_uri": storage.join(run_location(cfg), "best_model"),
        "run_name": cfg.run_name,
        "mlflow_run_id": run_id,
        "config_sha256": config_digest(cfg),
        **inputs.lineage,
        **{k.replace("/", "_"): f"{v:.6g}" for k, v in metrics.items() if k.startswith("val/")},
    }
    version = register_model(client, run_id, model_dir, cfg.tracking.registered_model, tags,
                             alias=cfg.tracking.alias)  # fmt: skip
    alias = f" (alias {cfg.tracking.alias})" if cfg.tracking.alias else ""
    print(f"registered {cfg.tracking.registered_model} version {version}{alias}")
    return version


class mark_run_on_exit:
    """Marks the MLflow run FAILED when training raises, KILLED when the job is stopped
    (Ray's job stop sends SIGTERM to the driver), so no run is left RUNNING."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set signal handlers

        def stopped(signum, frame):
            self.client.set_terminated(self.run_id, "KILLED")
            raise SystemExit(143)

        signal.signal(signal.SIGTERM, stopped)
        return self

    def __exit__(self, exc_type, exc, tb):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.previous)
        if exc_type is not None and not issubclass(exc_type, SystemExit):
            # A search's trial stopped by its scheduler ends here too, after the search
            # recorded it as KILLED: an end already recorded stands.
            if self.client.get_run(self.run_id).info.status == "RUNNING":
                self.client.set_terminated(self.run_id, "FAILED")
        return False


def redact(uri: str) -> str:
    """A tracking URI with any user:password@ part removed, fit for a log line."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri



def training_cli(doc: str, argv: list[str] | None, default_preset: str, presets: Path) -> int:
    """The command line of pipelines/pretrain.py and pipelines/finetune.py: one job, two
    default presets."""
    import argparse

    from vit_core.cli import run_cli

    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return run_cli(parser, argv, TrainConfig, run_training, default_preset, presets)
