"""The train step: forward and backward over micro-batches with gradient accumulation,
then clipping, the optimiser and schedule step, and the EMA update."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vit_core.train.checkpoint import unwrap
from vit_core.train.config import TrainConfig
from vit_core.train.model_setup import autocast


@dataclass(frozen=True)
class BatchPlan:
    """How the recipe's global batch is reached with `world` workers."""

    micro: int  # rows per worker per forward pass
    accum: int  # micro-batches per optimiser step
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, num_train: int, world: int, total_steps: int = 0) -> BatchPlan:
        """Gradient accumulation to train.global_batch_size with `world` workers; the step
        budget is `total_steps` when given (fixed once for a run whose worker count may
        change), else train.steps, or train.epochs passes over `num_train` images."""
        micro = cfg.train.micro_batch_size
        accum = max(1, cfg.train.global_batch_size // (micro * world))
        steps_per_epoch = max(1, num_train // (micro * world * accum))
        total = total_steps or cfg.train.steps or cfg.train.epochs * steps_per_epoch
        return cls(micro, accum, steps_per_epoch, total)


def masked_loss(logits, targets, valid, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over the valid rows. targets: class indices [B] or soft
    targets [B, C] (Mixup/CutMix); a batch with no valid row gives 0 and still takes
    part in DDP's all-reduce."""
    per_row = (
        torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1)
        if targets.ndim == 2
        else F.cross_entropy(
            logits.float(), targets, reduction="none", label_smoothing=label_smoothing
        )
    )
    weights = valid.float()
    return (per_row * weights).sum() / weights.sum().clamp(min=1.0)


@dataclass
class StepResult:
    loss: float  # mean over the accumulated micro-batches of the last one, as logged
    grad_norm: float  # global L2 norm before clipping


class TrainStep:
    """Feed micro-batches with `micro_step`; every `accum`-th one completes an optimiser
    step and returns its StepResult (None otherwise)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        cfg: TrainConfig,
        accum: int,
        device: torch.device,
        ema: nn.Module | None = None,
        mix=None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.cfg, self.accum, self.device, self.ema, self.mix = cfg, accum, device, ema, mix
        self.clip = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else math.inf
        self.micro_steps = 0

    def micro_step(self, images, labels, valid) -> StepResult | None:
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        last = (self.micro_steps + 1) % self.accum == 0
        # Gradients are all-reduced once per optimiser step, not per micro-batch.
        no_sync = not last and hasattr(self.model, "no_sync")
        with (
            self.model.no_sync() if no_sync else contextlib.nullcontext(),
            autocast(self.device, self.cfg.train.precision),
        ):
            loss = masked_loss(self.model(images), targets, valid, self.cfg.data.label_smoothing)
            (loss / self.accum).backward()
        self.micro_steps += 1
        if not last:
            return None
        value = loss.item()
        if not math.isfinite(value):
            # Weights updated from a non-finite loss are lost: stop, not train on. Ray
            # Train retries from the last checkpoint (scaling.max_failures); a search
            # records the trial as failed.
            raise FloatingPointError(f"training loss is {value}: the run diverged "
                                     "(learning rate too high?)")  # fmt: skip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.clip
        )
        if hasattr(grad_norm, "full_tensor"):  # a sharded (FSDP) model's norm
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.model))
        return StepResult(loss=value, grad_norm=float(grad_norm))

    def reset(self) -> None:
        """Start a new accumulation cycle (at an epoch start, where a partial one ends)."""
        self.micro_steps = 0
