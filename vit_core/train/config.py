"""The training job's typed config, shared by pretraining and fine-tuning: one section
per part of the trainer. The two jobs differ only in their presets (pipelines/configs/),
as nanoGPT's fine-tuning is a config of its training script."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vit_core.data import DataConfig


@dataclass
class ModelSection:
    # A vit_core.create_model name; None takes the architecture from `init_from`.
    name: str | None = "vit_ti16"
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
    # Weights to start from: models:/NAME@ALIAS or models:/NAME/VERSION (the registry), a
    # training run's checkpoint or best_model URI, or a timm / transformers / JAX .npz
    # file; local or s3://.
    init_from: str | None = None
    # A training checkpoint with EMA weights (timm's state_dict_ema): start from those.
    init_use_ema: bool = False
    # Fine-tuning (paper section 3.2): drop the whole pretraining head and put a single
    # zero-initialised linear layer for the dataset's classes in its place.
    replace_head: bool = False
    # Linear probe: train the head only, the backbone frozen.
    freeze_backbone: bool = False


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
    # Layer-wise learning-rate decay (BEiT, timm's layer_decay): block i of L gets
    # lr * layer_decay ** (L - i), the embeddings lr * layer_decay ** (L + 1). 1 disables.
    layer_decay: float = 1.0


@dataclass
class TrainSection:
    epochs: int = 10
    # A step budget (optimiser steps) instead of epochs, as the paper's fine-tuning
    # recipes give (Table 4: 10k for CIFAR, 500 for Pets/Flowers). 0: use epochs.
    steps: int = 0
    global_batch_size: int = 4096  # the recipe's batch, reached with gradient accumulation
    micro_batch_size: int = 64  # per worker per forward pass
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    seed: int = 0
    log_every_steps: int = 10
    # Validate every this many steps as well as at every epoch end (0: epoch ends only).
    eval_every_steps: int = 0


@dataclass
class CheckpointSection:
    every_steps: int = 1000  # also at every epoch end
    keep_last: int = 2


@dataclass
class ScalingSection:
    # A count, or a range MIN..MAX (elastic: Ray Train runs as many workers as the live
    # nodes hold, between the two, and restarts the group at another size when that
    # changes; the global batch and the step budget stay the recipe's).
    num_workers: int | str = 1
    use_gpu: bool = False
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: FSDP for L and H, else DDP
    cpus_per_worker: float = 1.0
    # PACK fills nodes in turn; SPREAD/STRICT_SPREAD put workers on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 3
    # How long one start of the worker group may wait for its resources (a new job, or a
    # restart after a failure); then the job stops with one line naming what it waited
    # for and what the cluster has, and its MLflow run is marked FAILED.
    wait_for_workers_s: float = 600.0
    # CPUs the trainers must leave free in the cluster for Ray Data's read and decode
    # tasks: trainers holding every CPU leave those tasks pending forever.
    data_cpus: float = 1.0
    # Elastic runs: how often Ray Train asks whether more workers fit than the running
    # group has (nodes that came back), and restarts it larger from its newest checkpoint.
    elastic_resize_monitor_interval_s: float = 60.0


@dataclass
class TrackingSection:
    experiment: str = "vit-pretrain"
    registered_model: str = "vit-pretrain"
    register: bool = True
    # An alias the new version gets (fine-tuning: "candidate", for promote.py).
    alias: str | None = None


@dataclass
class TrainConfig:
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
