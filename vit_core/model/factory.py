"""Model names and ``create_model``, in the manner of ``timm.create_model``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .vit import VisionTransformer, ViTConfig
from .weights import Checkpoint, load_checkpoint, read_checkpoint

__all__ = ["MODEL_CONFIGS", "create_model", "list_models"]

_TI = {"embed_dim": 192, "depth": 12, "num_heads": 3}
_S = {"embed_dim": 384, "depth": 12, "num_heads": 6}
_B = {"embed_dim": 768, "depth": 12, "num_heads": 12}  # paper Table 1: 86M
_L = {"embed_dim": 1024, "depth": 24, "num_heads": 16}  # 307M (304M with a 1000-class head)
_H = {"embed_dim": 1280, "depth": 32, "num_heads": 16}  # 632M

# name -> ViTConfig fields; everything else takes ViTConfig's defaults (224 px, 1000 classes)
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_ti16": {**_TI, "patch_size": 16},
    "vit_s16": {**_S, "patch_size": 16},
    "vit_s32": {**_S, "patch_size": 32},
    "vit_b16": {**_B, "patch_size": 16},
    "vit_b32": {**_B, "patch_size": 32},
    "vit_l16": {**_L, "patch_size": 16},
    "vit_l32": {**_L, "patch_size": 32},
    "vit_h14": {**_H, "patch_size": 14},
}

# timm's names for the same models, accepted so users can paste them
_ALIASES = {
    "vit_tiny_patch16_224": "vit_ti16",
    "vit_small_patch16_224": "vit_s16",
    "vit_small_patch32_224": "vit_s32",
    "vit_base_patch16_224": "vit_b16",
    "vit_base_patch32_224": "vit_b32",
    "vit_large_patch16_224": "vit_l16",
    "vit_large_patch32_224": "vit_l32",
    "vit_huge_patch14_224": "vit_h14",
}

_FIELDS = {f.name for f in fields(ViTConfig)}
# the head, taken from a checkpoint unless the caller overrides it
_HEAD_FIELDS = ("num_classes", "head", "representation_size")


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def create_model(
    name: str | None = None,
    checkpoint: str | Path | Mapping[str, Any] | Checkpoint | None = None,
    *,
    replace_head: bool = False,
    strict: bool = True,
    use_ema: bool = False,
    **overrides: Any,
) -> VisionTransformer:
    """Build a ViT by name and/or from a checkpoint, with ViTConfig fields as overrides.

    ``checkpoint`` is a local file or folder, or a state dict, in any format ``weights``
    reads. Without a name, the architecture comes from the checkpoint (this project's
    ``config.json``, a transformers ``config.json``, or the tensor shapes). The checkpoint's
    head is kept unless ``num_classes``/``head`` overrides differ from it or ``replace_head``
    is set; then the model gets a fresh zero-initialised head. From a training checkpoint
    (timm's ``model_best.pth.tar``) the trained weights are taken, or with ``use_ema`` the
    EMA ones (timm's ``load_checkpoint(..., use_ema=True)``, which timm defaults to).

    Raises ``CheckpointError`` (one line naming the file) for a checkpoint that cannot be
    read safely or does not fit, including hybrid (ResNet + ViT) checkpoints and patch
    embeddings over other than ``in_chans`` (default 3) channels; ``ValueError`` for an
    unknown name or an invalid configuration.

    >>> m = create_model("vit_b16", num_classes=10, img_size=384)
    >>> m = create_model(checkpoint="output/train/x/model_best.pth.tar", use_ema=True)
    """
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise TypeError(
            f"create_model got unknown option(s) {', '.join(unknown)}; "
            f"ViTConfig fields are: {', '.join(sorted(_FIELDS))}"
        )
    ckpt = None
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint, use_ema=use_ema, in_chans=overrides.get("in_chans", 3))

    if name is not None:
        key = _ALIASES.get(name, name)
        if key not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
        cfg = dict(MODEL_CONFIGS[key])
        if ckpt is not None and ckpt.head_type is not None:
            # the checkpoint's classifier defines the default head, not the name
            inferred = ckpt.infer_config(num_heads=cfg["num_heads"])
            cfg.update({k: inferred[k] for k in _HEAD_FIELDS if k in inferred})
        if ckpt is not None and "norm_eps" in ckpt.config:
            cfg["norm_eps"] = ckpt.config["norm_eps"]  # HF's 1e-12; names do not say
    elif ckpt is not None:
        inferred = ckpt.infer_config(num_heads=overrides.get("num_heads"))
        cfg = {k: v for k, v in inferred.items() if k in _FIELDS}
    else:
        raise ValueError("create_model needs a model name or a checkpoint")

    if replace_head and "head" not in overrides:
        cfg["head"] = "linear"  # a replaced head is the fine-tuning head
    cfg.update(overrides)
    try:
        config = ViTConfig(**cfg)
    except ValueError as e:
        where = f" (checkpoint {ckpt.source})" if ckpt is not None else ""
        raise ValueError(f"invalid model configuration{where}: {e}") from None

    model = VisionTransformer(config)
    if ckpt is not None:
        load_checkpoint(model, ckpt, replace_head=replace_head, strict=strict)
    return model
