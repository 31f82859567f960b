"""The per-worker training function that Ray Train runs on every worker.

It reads its dataset shard, trains, logs metrics (rank 0, to MLflow), and reports
checkpoints to Ray Train; Ray Train restarts failed workers from the last one.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import vit_core
from vit_core import storage
from vit_core.config import from_dict
from vit_core.data import iter_train_batches, mixup_fn
from vit_core.model import Block
from vit_core.train.checkpoint import (
    MODEL_DIR,
    Progress,
    gather_state,
    latest_stored_checkpoint,
    load_training_state,
    save_training_state,
    unwrap,
)
from vit_core.train.config import PretrainConfig
from vit_core.train.optim import build_optimizer, build_scheduler

# Variants large enough that their optimiser state is sharded by default.
FSDP_MODELS = ("vit_l", "vit_h")


def parallel_strategy(cfg: PretrainConfig) -> str:
    if cfg.scaling.strategy != "auto":
        return cfg.scaling.strategy
    return "fsdp" if cfg.model.name.startswith(FSDP_MODELS) and cfg.scaling.use_gpu else "ddp"


def build_model(cfg: PretrainConfig, num_classes: int) -> nn.Module:
    m = cfg.model
    overrides: dict[str, Any] = {
        "num_classes": num_classes,
        "img_size": m.img_size,
        "pool": m.pool,
        "head": m.head,
        "drop_rate": m.drop_rate,
        "attn_drop_rate": m.attn_drop_rate,
        "drop_path_rate": m.drop_path_rate,
        "grad_checkpointing": m.grad_checkpointing,
    }
    for name in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(m, name) is not None:
            overrides[name] = getattr(m, name)
    return vit_core.create_model(m.name, checkpoint=m.init_from, **overrides)


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP (torch's fully_shard): every Block is a unit whose parameters, gradients and
    optimiser state are split across the workers, then the rest of the model. Ours rather
    than prepare_model's, which only shards on GPUs: this runs on CPUs (gloo) too."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    return model


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def from_rank0(value: Any) -> Any:
    """Rank 0's value on every rank, so all workers act on one decision."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t)
    return t.tolist()


def masked_loss(logits, targets, valid, label_smoothing: float) -> torch.Tensor:
    """Mean loss over the valid rows; a batch with none still takes part in the all-reduce."""
    per_row = (
        torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1)
        if targets.ndim == 2
        else F.cross_entropy(
            logits.float(), targets, reduction="none", label_smoothing=label_smoothing
        )
    )
    weights = valid.float()
    return (per_row * weights).sum() / weights.sum().clamp(min=1.0)


@torch.no_grad()
def evaluate(
    model: nn.Module, shard, cfg: PretrainConfig, device: torch.device
) -> dict[str, float]:
    model.eval()
    correct1 = correct5 = seen = 0.0
    loss_sum = 0.0
    for images, labels, valid in iter_train_batches(
        shard, cfg.train.micro_batch_size, device, train=False
    ):
        with autocast(device, cfg.train.precision):
            logits = model(images).float()
        keep = valid.bool()
        logits, labels = logits[keep], labels[keep]
        if labels.numel() == 0:
            continue
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=-1).sum().item()
        seen += labels.numel()
    correct1, correct5, loss_sum, seen = all_reduce_sum(
        [correct1, correct5, loss_sum, seen], device
    )
    model.train()
    if seen == 0:
        return {}
    return {"val/top1": correct1 / seen, "val/top5": correct5 / seen, "val/loss": loss_sum / seen}


class StepTimer:
    """Images/s and the fraction of wall time spent waiting for the next batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.waiting = 0.0
        self.images = 0

    @contextlib.contextmanager
    def wait(self):
        t0 = time.perf_counter()
        yield
        self.waiting += time.perf_counter() - t0

    def rates(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "images_per_s": self.images * world_size / elapsed,
            "data_wait_fraction": self.waiting / elapsed,
        }


def timed(iterator, timer: StepTimer):
    it = iter(iterator)
    while True:
        with timer.wait():
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(PretrainConfig, config["cfg"])
    num_classes: int = config["num_classes"]
    num_train: int = config["num_train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)

    micro = cfg.train.micro_batch_size
    accum = max(1, cfg.train.global_batch_size // (micro * world))
    steps_per_epoch = max(1, num_train // (micro * world * accum))
    total_steps = cfg.train.epochs * steps_per_epoch

    model = build_model(cfg, num_classes)
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema_decay)
        )
        if cfg.optim.ema_decay > 0
        else None
    )
    if parallel_strategy(cfg) == "fsdp":
        model = shard_model(model, device)
    else:
        model = ray.train.torch.prepare_model(model)  # DDP when there is more than one worker
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, total_steps, cfg.optim)
    progress = Progress()
    # A fresh job, a resubmitted one and a restarted worker group all start here: the
    # run's newest complete checkpoint on storage, if any, is where training goes on.
    restored = from_rank0(latest_stored_checkpoint(config["run_location"]) if rank == 0 else None)
    if restored:
        directory = storage.materialize(restored.uri)
        progress = load_training_state(directory, model, optimizer, scheduler, ema)
        if rank == 0:
            print(
                f"resumed from {restored.uri} at step {progress.step}/{total_steps} "
                f"(data epoch {progress.epoch})",
                flush=True,
            )

    node_ids = [ray.get_runtime_context().get_node_id()] * world
    if distributed():
        dist.all_gather_object(node_ids, node_ids[0])
    logger = None
    if rank == 0 and config.get("mlflow_run_id"):
        from vit_core.track.runs import MetricLogger

        logger = MetricLogger(config["tracking_uri"], config["mlflow_run_id"])
        # A tag, not a param: a restarted worker group may land on other nodes.
        logger.client.set_tag(logger.run_id, "cluster.worker_nodes", ",".join(node_ids))
        # What actually wraps the model: DistributedDataParallel, FSDP<Model>, or the model.
        logger.client.set_tag(logger.run_id, "train.model_wrapper", type(model).__name__)
        if restored:
            logger.log({"resumed_from_step": progress.step}, progress.step)
    mix = mixup_fn(cfg.data, num_classes)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    timer = StepTimer()
    bad_since_report = 0
    clip = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else math.inf

    def report(extra: dict[str, float], epoch_end: bool) -> None:
        nonlocal bad_since_report
        progress.bad_samples += int(all_reduce_sum([bad_since_report], device)[0])
        bad_since_report = 0
        metrics = {
            "step": progress.step,
            "epoch": progress.epoch,
            "bad_samples": progress.bad_samples,
        }
        metrics.update(extra)
        improved = epoch_end and extra.get("val/top1", -1.0) > progress.best_top1
        if improved:
            progress.best_top1 = extra["val/top1"]
        weights, optim_state = gather_state(model, optimizer)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_training_state(
                    Path(tmp), unwrap(model), weights, optim_state, scheduler, progress, ema
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if improved and config.get("best_model_uri"):
                    storage.upload_dir(Path(tmp) / MODEL_DIR, config["best_model_uri"])
                if logger:
                    logger.log(
                        {k: float(v) for k, v in metrics.items() if k != "step"}, progress.step
                    )
                    logger.flush()
            ray.train.report(metrics, checkpoint=checkpoint)

    model.train()
    while progress.step < total_steps:
        epoch_end = (progress.step // steps_per_epoch + 1) * steps_per_epoch
        micro_step = 0
        timer.reset()
        batches = iter_train_batches(train_shard, micro, device, train=True, epoch=progress.epoch)
        progress.epoch += 1
        for images, labels, valid in timed(batches, timer):
            bad_since_report += int((~valid.bool()).sum())
            targets = labels
            if mix is not None:
                images, targets = mix(images, labels)
            last_micro = (micro_step + 1) % accum == 0
            sync = (
                contextlib.nullcontext()
                if last_micro or not hasattr(model, "no_sync")
                else model.no_sync()
            )
            with sync, autocast(device, cfg.train.precision):
                logits = model(images)
                loss = masked_loss(logits, targets, valid, cfg.data.label_smoothing) / accum
            loss.backward()
            timer.images += int(valid.sum())
            micro_step += 1
            if not last_micro:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if hasattr(grad_norm, "full_tensor"):  # a sharded (FSDP) model's norm
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(unwrap(model))
            progress.step += 1
            if logger and progress.step % cfg.train.log_every_steps == 0:
                logger.log(
                    {
                        "train/loss": loss.item() * accum,
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/grad_norm": float(grad_norm),
                        **{f"train/{k}": v for k, v in timer.rates(world).items()},
                    },
                    progress.step,
                )
                print(
                    f"step {progress.step}/{total_steps} loss {loss.item() * accum:.4f} "
                    f"{timer.rates(world)['images_per_s']:.1f} img/s",
                    flush=True,
                )
                timer.reset()
            if progress.step >= epoch_end:
                break
            if progress.step % cfg.checkpoint.every_steps == 0:
                report({}, epoch_end=False)
        if progress.step >= epoch_end:
            report(evaluate(model, val_shard, cfg, device), epoch_end=True)
    if logger:
        logger.flush()
