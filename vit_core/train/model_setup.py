"""Model setup for a training worker: build (from a name or starting weights), freeze,
then wrap for data parallelism (DDP, or torch's FSDP2) and optionally compile."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit_core import storage
from vit_core.model import Block, VisionTransformer
from vit_core.train.checkpoint import MODEL_DIR, unwrap
from vit_core.train.config import ModelSection, TrainConfig

# Variants large enough that their optimiser state is sharded by default.
FSDP_MODELS = ("vit_l", "vit_h")


def parallel_strategy(cfg: TrainConfig) -> str:
    """"ddp" or "fsdp": scaling.strategy, or FSDP for L and H on GPUs when "auto"."""
    if cfg.scaling.strategy != "auto":
        return cfg.scaling.strategy
    name = cfg.model.name or ""
    return "fsdp" if name.startswith(FSDP_MODELS) and cfg.scaling.use_gpu else "ddp"


def model_overrides(m: ModelSection, num_classes: int) -> dict[str, Any]:
    """The ViTConfig fields a model section sets (create_model's keyword arguments)."""
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
    return overrides


def build_model(
    m: ModelSection, num_classes: int, weights: Any = None
) -> VisionTransformer:
    """The section's model, from `weights` (a local checkpoint path, see
    vit_core.model.weights) when given; with m.replace_head the checkpoint's head is
    replaced by a zero-initialised linear layer (paper section 3.2), and position
    embeddings are interpolated to m.img_size. Raises CheckpointError, ValueError."""
    import vit_core

    model = vit_core.create_model(
        m.name, checkpoint=weights, replace_head=m.replace_head,
        use_ema=m.init_use_ema and weights is not None, **model_overrides(m, num_classes),
    )  # fmt: skip
    if m.freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(("head.", "pre_logits."))
    return model


def fetch_weights(location: str | None) -> Path | None:
    """A local path of the starting weights at `location`: models:/NAME/VERSION (the
    registry: the registered model's weight files, their SHA-256 checked), a training
    run's checkpoint (its model/ folder) or best_model/ folder, or a weight file; local
    or s3://. Raises StorageError, CheckpointError."""
    if location is None:
        return None
    if location.startswith("models:/"):
        from vit_core.track.registry import download_weights

        return download_weights(location)
    path = storage.materialize(location)
    if (path / MODEL_DIR / "config.json").is_file():  # a training checkpoint
        return path / MODEL_DIR
    return path


def full_cpu_model(model: nn.Module) -> VisionTransformer | None:
    """A plain CPU copy of a (DDP, FSDP or plain) model on rank 0, None elsewhere; every
    rank must call it (FSDP gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from vit_core.train.distributed import distributed

    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if distributed() and torch.distributed.get_rank() != 0:
        return None
    copy = VisionTransformer(unwrap(model).config)
    copy.load_state_dict(state)
    return copy.eval()


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


def wrap_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model as the workers train it: FSDP-sharded or DDP (Ray's prepare_model: DDP
    when there is more than one worker), then torch.compile if asked."""
    import ray.train.torch

    if parallel_strategy(cfg) == "fsdp":
        model = shard_model(model, device)
    else:
        # DDP synchronises only parameters that require gradients: a frozen backbone is
        # simply left out.
        model = ray.train.torch.prepare_model(model)
    if cfg.train.compile:
        model = torch.compile(model)
    return model


def autocast(device: torch.device, precision: str):
    """bf16 autocast on GPU ("auto") or when asked; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
