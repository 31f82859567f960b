"""The training job's typed config: one section per part of the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vit_core.data import DataConfig


@dataclass
class ModelSection:
    name: str = "vit_ti16"  # a vit_core.create_model name
    img_size: int = 224
    # None keeps the named variant's value; set them for a custom small model.
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    pool: Literal["token", "avg"] = "token"
    head: Literal["pretrain", "linear"] = "pretrain"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    init_from: str | None = None  # a checkpoint (timm, HF, JAX .npz, ours) to start from


@dataclass
class OptimSection:
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.03
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    min_lr: float = 0.0
    clip_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables the Polyak/EMA copy of the weights


@dataclass
class TrainSection:
    epochs: int = 10
    global_batch_size: int = 4096  # the recipe's batch, reached with gradient accumulation
    micro_batch_size: int = 64  # per worker per forward pass
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    seed: int = 0
    log_every_steps: int = 10


@dataclass
class CheckpointSection:
    every_steps: int = 1000  # also at every epoch end
    keep_last: int = 2


@dataclass
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: FSDP for L and H, else DDP
    cpus_per_worker: float = 1.0
    # PACK fills nodes in turn; SPREAD/STRICT_SPREAD put workers on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 3


@dataclass
class TrackingSection:
    experiment: str = "vit-pretrain"
    registered_model: str = "vit-pretrain"
    register: bool = True


@dataclass
class PretrainConfig:
    run_name: str = "vit-pretrain"
    # Where runs keep checkpoints: s3://bucket/prefix or a local directory.
    storage: str = "runs"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
