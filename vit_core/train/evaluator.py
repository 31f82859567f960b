"""The validator the training loop calls: the model over a validation shard, metrics
summed over every worker (vit_core.eval.metrics), a few images kept for pictures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vit_core.data import iter_train_batches
from vit_core.eval.metrics import ClassificationMetrics
from vit_core.train.distributed import all_reduce_array
from vit_core.train.model_setup import autocast


@dataclass
class Validation:
    """One validation pass: summed metrics over all workers and, on this worker, up to
    `keep` normalised images [3, S, S] with their labels and predictions."""

    metrics: ClassificationMetrics
    samples: list[tuple[torch.Tensor, int, int]] = field(default_factory=list)

    def scalars(self, prefix: str = "val/") -> dict[str, float]:
        """{"val/top1", "val/top5", "val/loss", "val/ece"}; empty when nothing was seen."""
        out = self.metrics.compute()
        out.pop("count", None)
        return {f"{prefix}{k}": v for k, v in out.items()}


@torch.no_grad()
def validate(
    model: nn.Module,
    shard,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    keep: int = 6,
) -> Validation:
    """Run `model` (plain, DDP or FSDP) over one pass of `shard` (a Ray Train dataset
    shard or a build_dataset Dataset, eval transforms) and all-reduce the metrics: every
    worker must call it. Bad rows (valid=False) are left out."""
    model.eval()
    metrics = ClassificationMetrics(num_classes)
    samples: list[tuple[torch.Tensor, int, int]] = []
    for images, labels, valid in iter_train_batches(shard, batch_size, device, train=False):
        with autocast(device, precision):
            logits = model(images).float()
        keep_rows = valid.bool()
        logits, labels = logits[keep_rows], labels[keep_rows]
        metrics.update(logits, labels)
        if len(samples) < keep and labels.numel():
            predicted = logits.argmax(-1)
            for image, label, pred in zip(images[keep_rows], labels, predicted, strict=True):
                samples.append((image.cpu(), int(label), int(pred)))
    model.train()
    metrics.load_tensor(all_reduce_array(metrics.to_tensor().to(device)))
    return Validation(metrics, samples[:keep])
