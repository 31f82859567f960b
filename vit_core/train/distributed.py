"""Collectives the training parts share; each is a no-op outside a process group, so
every part runs alone on one CPU process too (and is tested there)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def from_rank0(value: Any) -> Any:
    """Rank 0's value on every rank, so all workers act on one decision."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of `values` over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_array(array: torch.Tensor) -> torch.Tensor:
    """An int64/float tensor summed over all ranks (in place on the tensor's device)."""
    if distributed():
        dist.all_reduce(array)
    return array


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order."""
    if not distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
