"""Pictures people look at, as PNG bytes: curves, confusion matrices, attention maps."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_png(series: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    """One panel per metric, each a line over optimiser steps."""
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items(), strict=True):
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _png(fig)


def confusion_matrix_png(matrix: np.ndarray, class_names: list[str], title: str) -> bytes:
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.45 * n))
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour
                    )
    ax.set_title(title)
    return _png(fig)


def attention_png(images: np.ndarray, maps: np.ndarray, captions: list[str]) -> bytes:
    """Each image beside the class token's attention over the patches (last block,
    averaged over heads), upsampled to the image."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i])
        axes[0, i].set_title(captions[i], fontsize=8)
        axes[1, i].imshow(images[i])
        axes[1, i].imshow(
            maps[i], cmap="inferno", alpha=0.6,
            extent=(-0.5, images[i].shape[1] - 0.5, images[i].shape[0] - 0.5, -0.5),
        )  # fmt: skip
        for ax in axes[:, i]:
            ax.axis("off")
    return _png(fig)


def reliability_png(confidence: np.ndarray, accuracy: np.ndarray, count: np.ndarray,
                    title: str) -> bytes:  # fmt: skip
    """A reliability diagram (Guo et al. 2017, fig. 1): per confidence bin, the accuracy
    as a bar against the diagonal of perfect calibration, with the bins' counts below."""
    bins = len(count)
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, (ax, ax_count) = plt.subplots(
        2, 1, figsize=(4.2, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    filled = count > 0
    ax.bar(centres[filled], accuracy[filled], width=1 / bins, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(
        confidence[filled], accuracy[filled], "o", color="tab:red", ms=3, label="mean confidence"
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title)
    ax_count.bar(centres, count, width=1 / bins, color="grey")
    ax_count.set_xlabel("confidence (top-1 probability)")
    ax_count.set_ylabel("images")
    ax_count.set_xlim(0, 1)
    return _png(fig)


def search_png(trials: list[dict], keys: list[str], metric: str, log_keys: set[str]) -> bytes:
    """One panel per searched hyperparameter: each trial's final `metric` against its
    value. trials: dicts with `params` {key: value}, `value` (float or None) and `state`
    (completed, stopped early, failed); failed trials are drawn at the panel's bottom."""
    markers = {"completed": ("o", "tab:blue"), "stopped early": ("v", "tab:orange"),
               "failed": ("x", "tab:red")}  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    values = [t["value"] for t in trials if t["value"] is not None]
    floor = min(values, default=0.0)
    for ax, key in zip(axes[0], keys, strict=True):
        for state, (marker, colour) in markers.items():
            chosen = [t for t in trials if t["state"] == state]
            if not chosen:
                continue
            xs = [t["params"][key] for t in chosen]
            ys = [floor if t["value"] is None else t["value"] for t in chosen]
            ax.scatter(xs, ys, marker=marker, color=colour, label=state)
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"final {metric} per trial")
    return _png(fig)


def trial_curves_png(curves: dict[str, list[tuple[int, float]]], stopped: set[str],
                     metric: str, max_steps: int) -> bytes:  # fmt: skip
    """Every trial's `metric` over optimiser steps on one plot; a trial in `stopped` (cut
    short by the scheduler or failed) is dashed and ends in a cross where it stopped."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves.items():
        if not points:
            continue
        steps, values = zip(*sorted(points), strict=True)
        cut = name in stopped
        (line,) = ax.plot(steps, values, linestyle="--" if cut else "-", marker=".", label=name)
        if cut:
            ax.plot(steps[-1], values[-1], marker="x", markersize=10, color=line.get_color())
    ax.axvline(max_steps, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{metric} of every trial (dashed: stopped early or failed)")
    return _png(fig)
