"""The metrics logger of a training run: rank 0 writes to MLflow through a background
writer (vit_core.track.runs.MetricWriter) and prints one progress line every few steps;
the other ranks log nothing. At the end it draws the run's pictures."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from vit_core.train.evaluator import Validation


class StepTimer:
    """Images/s and the fraction of wall time spent waiting for the next batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.waiting = 0.0
        self.images = 0

    @contextlib.contextmanager
    def wait(self):
        t0 = time.perf_counter()
        yield
        self.waiting += time.perf_counter() - t0

    def rates(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "images_per_s": self.images * world_size / elapsed,
            "data_wait_fraction": self.waiting / elapsed,
        }


def timed(iterator, timer: StepTimer):
    """The items of `iterator`, with the time spent waiting for each added to `timer`."""
    it = iter(iterator)
    while True:
        with timer.wait():
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


class TrainLogger:
    """Rank 0's metrics: step metrics are staged and leave for MLflow when `commit` is
    called (after the checkpoint covering them is on storage), so a resumed run logs
    every step once. Without an MLflow run (or on ranks > 0) it only prints (rank 0)."""

    def __init__(
        self, rank: int, world: int, total_steps: int, log_every: int,
        tracking_uri: str | None = None, run_id: str | None = None,
    ) -> None:  # fmt: skip
        from vit_core.track.runs import MetricWriter

        self.rank, self.world, self.total_steps, self.log_every = rank, world, total_steps, log_every
        self.writer = MetricWriter(tracking_uri, run_id) if rank == 0 and run_id else None

    def tag(self, key: str, value: str) -> None:
        if self.writer:
            self.writer.client.set_tag(self.writer.run_id, key, value)

    def resumed(self, step: int, uri: str, metrics: list[list]) -> None:
        """Announce the resume, and send the resumed checkpoint's metrics that MLflow
        lacks (committed by a process killed before its writer sent them)."""
        if self.rank == 0:
            print(f"resumed from {uri} at step {step}/{self.total_steps}", flush=True)
        if self.writer:
            self.writer.replay(metrics)
            self.writer.log({"resumed_from_step": step}, step)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, timer: StepTimer) -> None:
        if self.rank != 0 or step % self.log_every:
            return
        rates = timer.rates(self.world)
        if self.writer:
            self.writer.stage(
                {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    **{f"train/{k}": v for k, v in rates.items()},
                },
                step,
            )
        print(
            f"step {step}/{self.total_steps} loss {loss:.4f} {rates['images_per_s']:.1f} img/s",
            flush=True,
        )
        timer.reset()

    def stage(self, step: int, metrics: dict[str, float]) -> list[list]:
        """Stage a checkpoint's metrics; returns every metric staged since the last
        commit, for the checkpoint to carry (empty on ranks > 0)."""
        if not self.writer:
            return []
        self.writer.stage(metrics, step)
        return self.writer.staged()

    def commit(self) -> None:
        """Release the staged metrics once their checkpoint is on storage."""
        if self.writer:
            self.writer.commit()

    def finish(
        self, run_name: str, validation: Validation | None, class_names: list[str],
        model, mean, std,
    ) -> None:  # fmt: skip
        """Send what is left, then log the pictures (rank 0): learning curves, the last
        validation's confusion matrix and reliability diagram, and attention maps of
        `model` (a plain CPU VisionTransformer) over the validation samples."""
        if not self.writer:
            return
        from vit_core.track import plots
        from vit_core.track.runs import log_png, metric_history

        self.writer.close()
        client, run_id = self.writer.client, self.writer.run_id
        curves = {k: metric_history(client, run_id, k) for k in ("train/loss", "train/lr", "val/top1")}
        log_png(client, run_id, plots.curves_png(curves, run_name), "curves.png")
        if validation is None:
            return
        m = validation.metrics
        log_png(client, run_id, plots.confusion_matrix_png(m.confusion, class_names, "validation"),
                "confusion_matrix.png")  # fmt: skip
        log_png(client, run_id, plots.reliability_png(*m.reliability(), "validation"),
                "reliability.png")  # fmt: skip
        if validation.samples and model is not None:
            log_png(client, run_id, attention_picture(model, validation.samples, class_names,
                                                      mean, std), "attention.png")  # fmt: skip


def attention_picture(model, samples, class_names: list[str], mean, std) -> bytes:
    """The class token's attention in the last block (mean over heads) beside each image."""
    from vit_core.track import plots

    batch = torch.stack([s[0] for s in samples]).float()
    with torch.no_grad():
        last = model.get_attention_maps(batch)[-1]  # [B, heads, N, N]
    grid = model.config.grid_size
    cls_attention = last.mean(1)[:, 0, model.num_prefix_tokens :].reshape(-1, *grid)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    pixels = [(img * s + m).clamp(0, 1).permute(1, 2, 0).numpy() for img in batch]
    captions = [f"true {class_names[t]} / pred {class_names[p]}" for _, t, p in samples]
    return plots.attention_png(np.stack(pixels), cls_attention.numpy(), captions)
