"""Optimiser and learning-rate schedule of the paper's recipes."""

from __future__ import annotations

import math

import torch
from torch import nn

from vit_core.train.checkpoint import unwrap
from vit_core.train.config import OptimSection


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head."""
    for wrapper in ("module.", "_orig_mod."):
        name = name.removeprefix(wrapper)
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, layer_decay: float = 1.0
) -> list[dict]:
    """Decay the weight matrices only: norms, biases and the embeddings the model names
    (position embeddings, class token) keep their learned scale. With layer_decay < 1,
    each layer's group gets lr * layer_decay ** (depth + 1 - layer_id) (BEiT, Bao et
    al. 2021, section 2.6; timm's param_groups_layer_decay)."""
    vit = unwrap(model)
    skip = vit.no_weight_decay()
    depth = vit.config.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name.rsplit(".", 1)[-1] in skip)
        layer = layer_id(name, depth) if layer_decay != 1.0 else depth + 1
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr": lr * layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    """The section's optimiser over the parameters that require gradients."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.layer_decay)
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
