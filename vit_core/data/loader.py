"""The train loop's side: torch batches from a dataset shard, and counting bad samples.

Rows arrive as uint8 and are normalised here, a whole batch at once on the target device
(mean/std travel with the dataset), so Ray moves a quarter of the bytes.

Every batch keeps its rows, bad ones included, so every DDP worker takes the same number
of steps; `valid` says which rows count. Bad rows arrive holding a copy of a good row of
the same batch (image and label), so batch-level Mixup/CutMix never blends in a blank
image; mask them out of the loss and the metrics with `valid`.
"""

from __future__ import annotations

import sys
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vit_core.data.reader import LOADER_CONFIG_KEY
from vit_core.data.transforms import normalize as normalize_images


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


class FloatBufferPool:
    """Float32 batch arrays, reused once nothing but the pool refers to them.

    A fresh array of a 224 px batch (38 MB at 64 images) is above glibc's largest mmap
    threshold, so every batch would be new pages, zeroed by the kernel on first write:
    that costs about as much as the normalisation itself. A buffer is handed out again
    only when no tensor or array made from it is alive (its reference count), so a loop
    that keeps a batch never sees it overwritten.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()  # Ray collates batches in a thread pool

    def get(self, shape: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            for buffer in self._buffers:
                # Referenced by the list, `buffer` and getrefcount's argument: free.
                if buffer.shape == shape and sys.getrefcount(buffer) == 3:
                    return buffer
            buffer = np.empty(shape, dtype=np.float32)
            if len(self._buffers) >= self.size:
                self._buffers.pop(0)
            self._buffers.append(buffer)
            return buffer


def _fill_bad_rows(
    batch: dict[str, np.ndarray],
    mean_std: tuple[list[float], list[float]] | None = None,
    pool: FloatBufferPool | None = None,
) -> dict[str, torch.Tensor]:
    """Torch tensors of a numpy batch, bad rows holding a good row's content; uint8 images
    normalised to float32 when `mean_std` is given, into a buffer of `pool` when given."""
    valid = np.array(batch["valid"], dtype=bool)  # a small copy, writable
    image, label = batch["image"], batch["label"]
    bad = np.flatnonzero(~valid)
    good = np.flatnonzero(valid)
    if mean_std is not None and image.dtype == np.uint8:
        out = pool.get(image.shape) if pool else None
        image = normalize_images(image, *mean_std, out=out)
    elif not image.flags.writeable:
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
        def __init__(self, mean_std: tuple[list[float], list[float]] | None) -> None:
            self.mean_std = mean_std
            self.pool = FloatBufferPool() if mean_std is not None else None

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return _fill_bad_rows(batch, self.mean_std, self.pool)

    return FillBadRows


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        # As iter_torch_batches does: the Train worker's device, else the CPU.
        try:
            from ray.train.torch import get_device
            from ray.train.utils import _in_ray_train_worker

            return torch.device(get_device()) if _in_ray_train_worker() else torch.device("cpu")
        except Exception:
            return torch.device("cpu")
    return torch.device(device)


def _mean_std(settings: dict[str, Any]) -> tuple[list[float], list[float]]:
    if "mean" not in settings or "std" not in settings:
        raise ValueError("uint8 images without mean/std: iterate a dataset made by build_dataset")
    return settings["mean"], settings["std"]


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
    normalize: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images float32 [B,3,S,S] normalised, labels int64 [B], valid bool [B]) on `device`,
    for one pass over the shard.

    `shard`: ray.train.get_dataset_shard(name), or a Dataset/DataIterator from build_dataset.
    train=True shuffles rows through a local buffer of the dataset's cfg.shuffle_buffer rows
    (seeded from cfg.seed and `epoch` when epoch is given) and drops the last short batch,
    so every batch has batch_size rows. `counter`, if given, counts the bad rows.
    normalize=False leaves uint8 images as they are, for a loop that normalises them itself
    (inside a compiled model, say); the dataset's mean and std are in loader_settings.
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
    target = _resolve_device(device)
    # uint8 rows are normalised where it is cheapest: in numpy on the loader's thread for a
    # CPU target (torch's CPU kernels are slower at it), on the GPU after the transfer
    # otherwise (4x fewer bytes to copy over PCIe).
    on_host = target.type == "cpu"
    mean_std = _mean_std(settings) if normalize and on_host and settings else None
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        device=target,
        collate_fn=_collate_class()(mean_std),
        drop_last=train if drop_last is None else drop_last,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=shuffle_seed if buffer else None,
        prefetch_batches=prefetch_batches,
    )
    device_scale: tuple[torch.Tensor, torch.Tensor] | None = None
    for batch in batches:
        images = batch["image"]
        if normalize and images.dtype == torch.uint8:
            if device_scale is None:
                mean, std = (
                    torch.tensor(v, dtype=torch.float32).reshape(1, 3, 1, 1) * 255
                    for v in _mean_std(settings)
                )
                device_scale = (mean.to(images.device), (1.0 / std).to(images.device))
            images = images.float().sub_(device_scale[0]).mul_(device_scale[1])
        if counter is not None:
            counter.add(batch["valid"])
        yield images, batch["label"], batch["valid"]
