"""The Vision Transformer in plain PyTorch: no Ray, MLflow or storage imports here.

Examples::

    create_model("vit_b16", num_classes=10)  # random init, zero-init head
    create_model("vit_b16", checkpoint="vit_b16.npz", img_size=384)  # JAX weights, at 384
    create_model(checkpoint="runs/x/model")  # this project's format, no name needed
    create_model(checkpoint="model_best.pth.tar", num_heads=4, use_ema=True)  # timm training run
"""

from .factory import MODEL_CONFIGS, create_model, list_models
from .vit import (
    Attention,
    Block,
    DropPath,
    Mlp,
    PatchEmbed,
    VisionTransformer,
    ViTConfig,
    resample_pos_embed,
)
from .weights import (
    Checkpoint,
    CheckpointError,
    convert_state_dict,
    export_npz,
    load_checkpoint,
    read_checkpoint,
    save_model,
)

__all__ = [
    "MODEL_CONFIGS",
    "Attention",
    "Block",
    "Checkpoint",
    "CheckpointError",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "ViTConfig",
    "VisionTransformer",
    "convert_state_dict",
    "create_model",
    "export_npz",
    "list_models",
    "load_checkpoint",
    "read_checkpoint",
    "resample_pos_embed",
    "save_model",
]
