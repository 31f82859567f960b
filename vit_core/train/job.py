"""The driver side of a training job: validate inputs, open the MLflow run, hand the
per-worker loop to Ray Train, then register the result and log its pictures."""

from __future__ import annotations

import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from vit_core import cluster, storage
from vit_core.config import ConfigError, to_dict
from vit_core.data import DatasetIndex, build_dataset, iter_train_batches, open_dataset
from vit_core.model import create_model
from vit_core.track import plots
from vit_core.track.registry import register_model
from vit_core.track.runs import (
    log_config,
    metric_history,
    set_tracking,
    start_or_resume_run,
    tracking_uri,
)
from vit_core.train.checkpoint import MODEL_DIR, latest_stored_checkpoint, read_progress
from vit_core.train.config import PretrainConfig
from vit_core.train.loop import parallel_strategy, train_loop_per_worker


@dataclass
class TrainingOutcome:
    mlflow_run_id: str
    checkpoint_uri: str
    final_step: int
    metrics: dict
    registered_version: str | None


def run_location(cfg: PretrainConfig) -> str:
    """Where the run keeps what outlives Ray's checkpoints (the best model)."""
    root = cfg.storage if storage.is_remote(cfg.storage) else str(Path(cfg.storage).absolute())
    return storage.join(root, cfg.run_name)


def run_pretraining(cfg: PretrainConfig) -> TrainingOutcome:
    # Inputs are checked before any worker starts: a bad dataset fails here, clearly.
    if parallel_strategy(cfg) == "fsdp" and cfg.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay: an EMA copy of the weights is not supported with FSDP")
    index = open_dataset(cfg.data.location)
    cluster.connect()
    uri = tracking_uri()
    client = set_tracking(uri)
    run_id, resumed = start_or_resume_run(client, cfg.tracking.experiment, cfg.run_name)
    print(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {redact(uri)}")
    log_config(
        client,
        run_id,
        cfg,
        {
            "version.ray": ray.__version__,
            "version.torch": torch.__version__,
            "version.python": platform.python_version(),
            "cluster.num_workers": cfg.scaling.num_workers,
            "cluster.num_gpus": cfg.scaling.num_workers if cfg.scaling.use_gpu else 0,
            "data.num_classes": index.num_classes,
            "data.num_train": index.num_samples("train"),
        },
    )

    location = run_location(cfg)
    best_model_uri = storage.join(location, "best_model")
    latest = latest_stored_checkpoint(location)
    if latest is not None:
        print(f"resuming run {cfg.run_name} from step {latest.step} ({latest.uri})", flush=True)
    fs, path = storage.pyarrow_filesystem(cfg.storage)
    if not storage.is_remote(cfg.storage):
        Path(path).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "num_classes": index.num_classes,
            "num_train": index.num_samples("train"),
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "best_model_uri": best_model_uri,
            "run_location": location,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
        datasets={
            "train": build_dataset(cfg.data, "train", train=True),
            "val": build_dataset(cfg.data, "val", train=False),
        },
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training run {cfg.run_name} finished without a checkpoint")
    checkpoint_uri = full_uri(cfg.storage, checkpoint.path)
    with checkpoint.as_directory() as directory:
        model_dir = Path(tempfile.mkdtemp(prefix="vit-final-")) / MODEL_DIR
        shutil.copytree(Path(directory) / MODEL_DIR, model_dir)
        progress = read_progress(Path(directory))

    log_pictures(client, run_id, cfg, index, model_dir)
    version = None
    if cfg.tracking.register:
        version = register_model(
            client,
            run_id,
            model_dir,
            cfg.tracking.registered_model,
            preprocessing={
                "class_names": index.class_names,
                "image_size": cfg.model.img_size,
                "mean": list(cfg.data.mean),
                "std": list(cfg.data.std),
            },
            tags={
                "dataset": cfg.data.location,
                "dataset_version": index.version,
                "checkpoint_uri": checkpoint_uri,
                "best_model_uri": best_model_uri,
                "run_name": cfg.run_name,
            },
        )
        print(f"registered {cfg.tracking.registered_model} version {version}")
    client.set_terminated(run_id)
    return TrainingOutcome(run_id, checkpoint_uri, progress.step, dict(result.metrics), version)


def full_uri(storage_root: str, checkpoint_path: str) -> str:
    """Ray reports checkpoint paths without the s3:// scheme when given a filesystem."""
    if storage.is_remote(storage_root) and not checkpoint_path.startswith("s3://"):
        return f"s3://{checkpoint_path.lstrip('/')}"
    return checkpoint_path


def redact(uri: str) -> str:
    """A tracking URI with any user:password@ part removed, fit for a log line."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def log_pictures(
    client, run_id: str, cfg: PretrainConfig, index: DatasetIndex, model_dir: Path
) -> None:
    """Learning curves, the validation confusion matrix and attention maps, as PNGs."""
    curves = {
        key: metric_history(client, run_id, key) for key in ("train/loss", "train/lr", "val/top1")
    }
    log_png(client, run_id, plots.curves_png(curves, cfg.run_name), "curves.png")

    model = create_model(checkpoint=model_dir).eval()
    n = index.num_classes
    matrix = np.zeros((n, n), dtype=np.int64)
    samples: list[tuple[torch.Tensor, int, int]] = []
    val = build_dataset(cfg.data, "val", train=False).iterator()
    with torch.no_grad():
        for images, labels, valid in iter_train_batches(val, 256, torch.device("cpu"), train=False):
            keep = valid.bool()
            images, labels = images[keep], labels[keep]
            predicted = model(images).argmax(-1)
            np.add.at(matrix, (labels.numpy(), predicted.numpy()), 1)
            if len(samples) < 6:
                samples += list(
                    zip(images[:6], labels[:6].tolist(), predicted[:6].tolist(), strict=True)
                )
    log_png(
        client,
        run_id,
        plots.confusion_matrix_png(matrix, index.class_names, "validation"),
        "confusion_matrix.png",
    )
    samples = samples[:6]
    if samples:
        batch = torch.stack([s[0] for s in samples])
        last = model.get_attention_maps(batch)[-1]  # [B, heads, N, N]
        grid = model.config.grid_size
        cls_attention = last.mean(1)[:, 0, model.num_prefix_tokens :].reshape(-1, *grid)
        mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
        std = torch.tensor(cfg.data.std).view(3, 1, 1)
        pixels = [((img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()) for img in batch]
        captions = [
            f"true {index.class_names[t]} / pred {index.class_names[p]}" for _, t, p in samples
        ]
        log_png(
            client,
            run_id,
            plots.attention_png(np.stack(pixels), cls_attention.numpy(), captions),
            "attention.png",
        )


def log_png(client, run_id: str, png: bytes, name: str) -> None:
    """Log PNG bytes as plots/<name> (through a file with an absolute path: a job's
    working directory may already be cleaned up when the job ends)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(png)
        client.log_artifact(run_id, str(path), "plots")
