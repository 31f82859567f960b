"""Training state to and from a checkpoint directory, without pickled code.

A checkpoint directory holds:
  model/             the weights in vit_core's format (safetensors + config.json)
  train_state.pt     optimiser, schedule, EMA and RNG state: tensors and plain values
                     only, read back with torch.load(weights_only=True)
  progress.json      step, epoch and the MLflow run id
  metrics.json       the MLflow metrics logged since the previous checkpoint
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vit_core import storage
from vit_core.data.preprocessing import Preprocessing
from vit_core.model import VisionTransformer, save_model

MODEL_DIR = "model"
STATE_FILE = "train_state.pt"
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.json"  # the MLflow metrics since the previous checkpoint
# Every file a checkpoint needs to be resumed from; a checkpoint missing one was cut
# short (its upload interrupted) and is passed over.
CHECKPOINT_FILES = frozenset(
    {f"{MODEL_DIR}/model.safetensors", f"{MODEL_DIR}/config.json", STATE_FILE, PROGRESS_FILE}
)


@dataclass
class Progress:
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # passes over the training data started
    bad_samples: int = 0  # skipped corrupt samples so far
    best_top1: float = -1.0


def unwrap(model: nn.Module) -> VisionTransformer:
    """The VisionTransformer inside DDP/compile wrappers."""
    while not isinstance(model, VisionTransformer):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            raise TypeError("no VisionTransformer inside the wrapped model")
    return model


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimiser state keyed by parameter names, in CPU memory: the
    same for a plain, DDP or FSDP model. Under a process group every rank must call it;
    the state lands on rank 0 (the other ranks get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_training_state(
    directory: Path,
    config_model: VisionTransformer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    ema: nn.Module | None = None,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Write a checkpoint from gathered state (rank 0 only); the model folder carries
    `preprocessing` (the preprocessing contract) when given. With an EMA copy, the model
    folder (what is validated, registered and served) holds the averaged weights, and
    the trained ones go into train_state.pt for resuming (paper section 3.2: Polyak
    averaging)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu() for k, v in weights.items()}
    # A fresh CPU model of the same config carries the weights into save_model.
    cpu_model = VisionTransformer(config_model.config)
    cpu_model.load_state_dict(ema.module.state_dict() if ema is not None else weights)
    save_model(cpu_model, directory / MODEL_DIR)
    if preprocessing is not None:
        preprocessing.save(directory / MODEL_DIR)
    state = {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
        state["model"] = weights
    torch.save(state, directory / STATE_FILE)
    (directory / PROGRESS_FILE).write_text(json.dumps(asdict(progress)))
    return directory


def load_training_state(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: nn.Module | None = None,
) -> Progress:
    """Put a checkpoint's state into a plain, DDP or FSDP model and its optimiser (every
    rank reads the whole checkpoint and keeps its own shard)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state.get("model")  # the trained weights of an EMA run
        or load_file(directory / MODEL_DIR / "model.safetensors"),
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    return Progress(**json.loads((directory / PROGRESS_FILE).read_text()))


@dataclass(frozen=True)
class StoredCheckpoint:
    uri: str
    step: int


def checkpoint_files(run_location: str) -> dict[str, set[str]]:
    """Each checkpoint folder under a run's location (`checkpoint_<time>`) -> the paths of
    the files in it, relative to the folder. Files beside the folders are left out (Ray
    Train's `checkpoint_manager_snapshot.json` shares their prefix)."""
    prefix = run_location.rstrip("/") + "/"
    files: dict[str, set[str]] = defaultdict(set)
    for uri in storage.list_files(run_location):
        name, _, rest = uri[len(prefix) :].partition("/")
        if name.startswith("checkpoint_") and rest:
            files[name].add(rest)
    return files


def latest_stored_checkpoint(run_location: str) -> StoredCheckpoint | None:
    """The complete checkpoint with the most steps under a run's location, if any.

    Resuming reads storage rather than trusting `ray.train.get_checkpoint()` alone: Ray
    hands over only checkpoints its controller has registered and written into its run
    snapshot, and a job stopped, or a worker killed, just after an upload leaves newer
    complete checkpoints that it never registered (sometimes none at all).
    """
    prefix = run_location.rstrip("/") + "/"
    files = checkpoint_files(run_location)
    complete = [prefix + name for name, found in files.items() if CHECKPOINT_FILES <= found]
    steps = [
        StoredCheckpoint(uri, json.loads(storage.read_bytes(f"{uri}/{PROGRESS_FILE}"))["step"])
        for uri in complete
    ]
    return max(steps, key=lambda c: c.step, default=None)


def remove_incomplete_checkpoints(run_location: str) -> list[str]:
    """Delete the checkpoint folders that miss a file (an upload cut short by a killed
    worker or a stopped job) and are older than the newest complete one, which a resume
    takes instead. Ray Train names checkpoint folders by time, so older sorts first.
    Returns the folders deleted."""
    prefix = run_location.rstrip("/") + "/"
    files = checkpoint_files(run_location)
    complete = [name for name, found in files.items() if CHECKPOINT_FILES <= found]
    if not complete:
        return []
    newest = max(complete)
    stale = [
        prefix + n for n, found in files.items() if n < newest and not CHECKPOINT_FILES <= found
    ]
    for uri in stale:
        storage.delete(uri)
    return stale


class Checkpointer:
    """A worker's side of checkpoints: `restore` finds the run's newest complete one on
    storage and loads it; `save` gathers the state (every rank calls it), writes it on
    rank 0, hands it to Ray Train with the metrics (which uploads it under the run's
    location), and keeps a copy of the weights as `best_model/` when asked.

    Resuming reads storage rather than `ray.train.get_checkpoint()` alone: see
    latest_stored_checkpoint.
    """

    def __init__(
        self, run_location: str, rank: int, model, optimizer, scheduler, ema=None,
        preprocessing: Preprocessing | None = None,
    ) -> None:  # fmt: skip
        self.run_location = run_location
        self.preprocessing = preprocessing
        self.best_model_uri = storage.join(run_location, "best_model")
        self.rank = rank
        self.restored_metrics: list = []  # the resumed checkpoint's metric segment
        self.swept = False  # whether this worker group removed the cut-short checkpoints
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema

    def restore(self) -> tuple[Progress, str | None]:
        """(progress, the checkpoint URI restored from, or None for a fresh start)."""
        from vit_core.train.distributed import from_rank0

        found = latest_stored_checkpoint(self.run_location) if self.rank == 0 else None
        found = from_rank0(found)
        if found is None:
            return Progress(), None
        directory = storage.materialize(found.uri)
        progress = load_training_state(
            directory, self.model, self.optimizer, self.scheduler, self.ema
        )
        if (directory / METRICS_FILE).is_file():
            self.restored_metrics = json.loads((directory / METRICS_FILE).read_text())
        return progress, found.uri

    def save(self, progress: Progress, metrics: dict, best: bool, segment: list) -> None:
        """Checkpoint `progress` with `metrics` reported to Ray Train; returns once the
        checkpoint is on storage. `segment`: the MLflow metrics logged since the last
        checkpoint (rows of MetricWriter.staged), which a resume sends again if MLflow
        lacks them."""
        import tempfile

        import ray.train

        weights, optim_state = gather_state(self.model, self.optimizer)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                save_training_state(
                    Path(tmp), unwrap(self.model), weights, optim_state, self.scheduler,
                    progress, self.ema, self.preprocessing,
                )  # fmt: skip
                (Path(tmp) / METRICS_FILE).write_text(json.dumps(segment))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if best:
                    storage.upload_dir(Path(tmp) / MODEL_DIR, self.best_model_uri)
            ray.train.report(metrics, checkpoint=checkpoint)
        if self.rank == 0 and not self.swept:
            # Cut-short uploads come from an earlier worker group or job (a killed worker,
            # a stopped job): all are older than this group's first checkpoint, just put on
            # storage, so one sweep then finds them and later saves make no storage call.
            remove_incomplete_checkpoints(self.run_location)
            self.swept = True
