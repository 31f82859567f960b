"""Optimiser and learning-rate schedule of the paper's recipes."""

from __future__ import annotations

import math

import torch
from torch import nn

from vit_core.train.checkpoint import unwrap
from vit_core.train.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices only: norms, biases and the embeddings the model names
    (position embeddings, class token) keep their learned scale."""
    skip = unwrap(model).no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.rsplit(".", 1)[-1] in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "adam":
        # The paper's Adam applies decay as an L2 term; AdamW decouples it.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


def lr_factor(step: int, total_steps: int, cfg: OptimSection) -> float:
    """Multiplier of the base learning rate at an optimiser step: warmup, then decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimSection
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg)
    )
