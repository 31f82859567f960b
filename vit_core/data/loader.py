"""The train loop's side: torch batches from a dataset shard, and counting bad samples.

Rows arrive as uint8 and are normalised here, a whole batch at once on the target device
(mean/std travel with the dataset), so Ray moves a quarter of the bytes.

Every batch keeps its rows, bad ones included, so every DDP worker takes the same number
of steps; `valid` says which rows count. Bad rows arrive holding a copy of a good row of
the same batch (image and label), so batch-level Mixup/CutMix never blends in a blank
image; mask them out of the loss and the metrics with `valid`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vit_core.data.reader import LOADER_CONFIG_KEY


class BadSampleCounter:
    """Bad rows seen by this worker. `add` keeps device tensors as they are (no sync per
    batch); reading `bad` syncs once. Sum it over workers for a global figure."""

    def __init__(self) -> None:
        self.seen = 0
        self._bad: list[Any] = []

    def add(self, valid: torch.Tensor) -> None:
        self.seen += int(valid.numel())
        self._bad.append((~valid.bool()).sum())
        if len(self._bad) > 64:
            self._bad = [torch.stack(self._bad).sum()]

    @property
    def bad(self) -> int:
        return int(sum(int(t) for t in self._bad))

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        bad = self.bad
        return {f"{prefix}bad_samples": bad, f"{prefix}bad_fraction": bad / max(self.seen, 1)}


def clean_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, labels, number dropped) with the bad rows of a torch batch removed, for code
    that iterates `iter_torch_batches` itself."""
    valid = batch["valid"].bool()
    bad = int((~valid).sum())
    if bad == 0:
        return batch["image"], batch["label"], 0
    return batch["image"][valid], batch["label"][valid], bad


def _fill_bad_rows(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    valid = np.array(batch["valid"], dtype=bool)  # a small copy, writable
    image, label = batch["image"], batch["label"]
    bad = np.flatnonzero(~valid)
    good = np.flatnonzero(valid)
    if not image.flags.writeable:
        # Arrow-backed batches are read-only views of the object store; the loop may write
        # into its tensors (timm's Mixup mixes in place).
        image = image.copy()
    if not label.flags.writeable:
        label = label.copy()
    if len(bad) and len(good):
        donors = good[np.arange(len(bad)) % len(good)]
        image[bad] = image[donors]
        label[bad] = label[donors]
    return {
        "image": torch.as_tensor(image),
        "label": torch.as_tensor(label, dtype=torch.int64),
        "valid": torch.as_tensor(valid),
    }


def _collate_class():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class FillBadRows(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return _fill_bad_rows(batch)

    return FillBadRows


def loader_settings(shard) -> dict[str, Any]:
    """The settings build_dataset stored with the dataset (shuffle buffer, seed)."""
    try:
        # A Dataset holds its context; an iterator (a Train worker's shard) asks for it.
        context = shard.context if hasattr(shard, "context") else shard.get_context()
        return dict(context.get_config(LOADER_CONFIG_KEY) or {})
    except Exception:  # a dataset not made by build_dataset
        return {}


def iter_train_batches(
    shard,
    batch_size: int,
    device: torch.device | str | None = "auto",
    *,
    train: bool = True,
    epoch: int | None = None,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
    counter: BadSampleCounter | None = None,
    drop_last: bool | None = None,
    prefetch_batches: int = 2,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images float32 [B,3,S,S] normalised, labels int64 [B], valid bool [B]) on `device`,
    for one pass over the shard.

    `shard`: ray.train.get_dataset_shard(name), or a Dataset/DataIterator from build_dataset.
    train=True shuffles rows through a local buffer of the dataset's cfg.shuffle_buffer rows
    (seeded from cfg.seed and `epoch` when epoch is given) and drops the last short batch,
    so every batch has batch_size rows. `counter`, if given, counts the bad rows.
    """
    settings = loader_settings(shard)
    if shuffle_buffer is None:
        shuffle_buffer = int(settings.get("shuffle_buffer", 0)) if train else 0
    if seed is None:
        seed = int(settings.get("seed", 0))
    shuffle_seed = None
    if epoch is not None:
        shuffle_seed = zlib.crc32(f"{seed}/{epoch}".encode())
    if hasattr(shard, "iterator") and not hasattr(shard, "iter_torch_batches"):
        shard = shard.iterator()
    buffer = max(shuffle_buffer, batch_size) if train and shuffle_buffer > 0 else None
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        device=device if device is not None else "cpu",
        collate_fn=_collate_class()(),
        drop_last=train if drop_last is None else drop_last,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=shuffle_seed if buffer else None,
        prefetch_batches=prefetch_batches,
    )
    scale: tuple[torch.Tensor, torch.Tensor] | None = None
    for batch in batches:
        images = batch["image"]
        if images.dtype == torch.uint8:
            if scale is None:
                scale = _scale(settings or loader_settings(shard), images.device)
            # On the device, as a whole batch: free on a GPU, one pass on a CPU.
            images = images.float().sub_(scale[0]).mul_(scale[1])
        if counter is not None:
            counter.add(batch["valid"])
        yield images, batch["label"], batch["valid"]


def _scale(settings: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor]:
    if "mean" not in settings or "std" not in settings:
        raise ValueError(
            "uint8 images without mean/std: iterate a dataset made by build_dataset"
        )
    mean = torch.tensor(settings["mean"], dtype=torch.float32, device=device) * 255
    std = torch.tensor(settings["std"], dtype=torch.float32, device=device) * 255
    return mean.view(1, 3, 1, 1), (1.0 / std).view(1, 3, 1, 1)
