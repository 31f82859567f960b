"""Classification metrics as sums, so they add up over batches, workers and actors.

    m = ClassificationMetrics(num_classes=10)
    m.update(logits, labels)          # logits float [B, C], labels int64 [B]
    m.merge(other)                    # or all-reduce m.to_tensor() across ranks
    m.compute()                       # {"top1", "top5", "loss", "ece", "count"}

The expected calibration error follows Guo et al. 2017 ("On Calibration of Modern
Neural Networks", eq. 3): the top-1 confidence is split into equal-width bins and the
gaps between each bin's accuracy and mean confidence are averaged, weighted by count.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15  # Guo et al. use 15 bins


class ClassificationMetrics:
    """Running sums over (logits, label) pairs: the confusion matrix [C, C] (rows are the
    true class), top-5 hits, the summed cross-entropy loss, and per confidence bin the
    count, the summed confidence and the summed top-1 hits."""

    def __init__(self, num_classes: int, bins: int = ECE_BINS) -> None:
        self.num_classes = num_classes
        self.bins = bins
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.top5_hits = 0
        self.loss_sum = 0.0
        self.calibration = np.zeros((bins, 3), dtype=np.float64)  # count, conf, hits

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: logits float [B, C] (any device, any float dtype), labels int [B]."""
        if labels.numel() == 0:
            return
        logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        self.top5_hits += int((top == labels[:, None]).any(dim=-1).sum())
        predicted = top[:, 0]
        np.add.at(self.confusion, (labels.numpy(), predicted.numpy()), 1)
        confidence = logits.softmax(-1).max(-1).values.numpy()
        hits = (predicted == labels).numpy().astype(np.float64)
        self.add_calibration(confidence, hits)

    def add_calibration(self, confidence: np.ndarray, hits: np.ndarray) -> None:
        """Add top-1 confidences in [0, 1] and whether each top-1 was right (0/1)."""
        idx = np.minimum((confidence * self.bins).astype(np.int64), self.bins - 1)
        np.add.at(self.calibration[:, 0], idx, 1.0)
        np.add.at(self.calibration[:, 1], idx, confidence)
        np.add.at(self.calibration[:, 2], idx, hits)

    def merge(self, other: ClassificationMetrics) -> ClassificationMetrics:
        self.confusion += other.confusion
        self.top5_hits += other.top5_hits
        self.loss_sum += other.loss_sum
        self.calibration += other.calibration
        return self

    def to_tensor(self) -> torch.Tensor:
        """Every sum in one float64 vector, for one all-reduce across ranks."""
        return torch.from_numpy(
            np.concatenate(
                [
                    self.confusion.ravel().astype(np.float64),
                    [self.top5_hits, self.loss_sum],
                    self.calibration.ravel(),
                ]
            )
        )

    def load_tensor(self, flat: torch.Tensor) -> ClassificationMetrics:
        """The inverse of to_tensor (after the all-reduce)."""
        v = flat.detach().cpu().double().numpy()
        n = self.num_classes * self.num_classes
        self.confusion = np.rint(v[:n]).astype(np.int64).reshape(self.num_classes, -1)
        self.top5_hits, self.loss_sum = int(round(v[n])), float(v[n + 1])
        self.calibration = v[n + 2 :].reshape(self.bins, 3).copy()
        return self

    def per_class_accuracy(self) -> np.ndarray:
        """Recall of each true class [C]; NaN for a class with no samples."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, np.diag(self.confusion) / totals, np.nan)

    def expected_calibration_error(self) -> float:
        count, conf, hits = self.calibration.T
        total = count.sum()
        if total == 0:
            return float("nan")
        used = count > 0
        gaps = np.abs(hits[used] / count[used] - conf[used] / count[used])
        return float((gaps * count[used]).sum() / total)

    def reliability(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin: (mean confidence, accuracy, count); NaN for empty bins."""
        count, conf, hits = self.calibration.T
        with np.errstate(invalid="ignore", divide="ignore"):
            return conf / count, hits / count, count

    def compute(self) -> dict[str, float]:
        """top1, top5 and ece as fractions, loss as mean cross-entropy (nats), count."""
        n = self.count
        if n == 0:
            return {}
        return {
            "top1": float(np.trace(self.confusion) / n),
            "top5": self.top5_hits / n,
            "loss": self.loss_sum / n,
            "ece": self.expected_calibration_error(),
            "count": float(n),
        }
