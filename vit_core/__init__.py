"""ViT platform core library.

`vit_core.create_model` is `vit_core.model.create_model` that also takes `s3://`
checkpoints: the object store is read here, so the model package stays plain PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["create_model"]


def create_model(name: str | None = None, checkpoint: Any = None, **overrides: Any):
    from vit_core import storage
    from vit_core.model import create_model as create_local

    if isinstance(checkpoint, str | Path) and storage.is_remote(str(checkpoint)):
        checkpoint = storage.materialize(str(checkpoint))
    return create_local(name, checkpoint=checkpoint, **overrides)
