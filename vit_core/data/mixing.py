"""Batch-level Mixup / CutMix / label smoothing, from timm, for the train loop."""

from __future__ import annotations

from collections.abc import Callable

import torch

MixFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mixup_fn(cfg, num_classes: int) -> MixFn | None:
    """A callable (images, labels) -> (images, soft targets [B, num_classes]), or None when
    cfg.mixup, cfg.cutmix and cfg.label_smoothing are all 0. With only label smoothing the
    images pass unchanged and the targets are smoothed one-hot. Use a soft-target loss
    (timm's SoftTargetCrossEntropy, or -sum(targets * log_softmax)) on its output.

    timm's Mixup mixes a batch with its reverse and needs an even batch: an odd one keeps its
    last row unmixed (with a smoothed target)."""
    from timm.data.mixup import Mixup, mixup_target

    smoothing = float(cfg.label_smoothing)
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        if smoothing <= 0:
            return None

        def smooth(images: torch.Tensor, labels: torch.Tensor):
            return images, mixup_target(labels, num_classes, lam=1.0, smoothing=smoothing)

        return smooth

    mix = Mixup(
        mixup_alpha=float(cfg.mixup),
        cutmix_alpha=float(cfg.cutmix),
        label_smoothing=smoothing,
        num_classes=num_classes,
    )

    def apply(images: torch.Tensor, labels: torch.Tensor):
        n = images.shape[0]
        if n % 2 == 0:
            return mix(images, labels)
        if n == 1:
            return images, mixup_target(labels, num_classes, lam=1.0, smoothing=smoothing)
        head, targets = mix(images[:-1], labels[:-1])
        last = mixup_target(labels[-1:], num_classes, lam=1.0, smoothing=smoothing)
        return torch.cat([head, images[-1:]]), torch.cat([targets, last])

    return apply
