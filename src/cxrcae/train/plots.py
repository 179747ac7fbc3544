"""Training figures (matplotlib's ``Figure`` API: no pyplot, no backend switch; written atomically)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cxrcae._atomic import atomic_write_bytes


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def loss_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train/val loss per epoch (log scale when it spans decades), stage boundaries dashed, best epoch
    marked; validation accuracy in a second panel when the history has it."""

    epochs = [r["epoch"] for r in history]
    has_acc = any("val_accuracy" in r for r in history)
    fig = Figure(figsize=(11 if has_acc else 6.5, 4))
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [r["train_loss"] for r in history], "o-", ms=3, label="train")
    ax.plot(epochs, [r["val_loss"] for r in history], "o-", ms=3, label="validation")
    best = [r for r in history if int(r.get("best", 0))]
    if best:
        last_best = best[-1]
        ax.plot(
            [last_best["epoch"]], [last_best["val_loss"]], "*", ms=14, color="gold", mec="k", label="best"
        )
    losses = [r[k] for r in history for k in ("train_loss", "val_loss")]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:  # log only when it spans decades
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    for i in range(1, len(history)):
        if history[i]["stage"] != history[i - 1]["stage"]:
            for a in axes[0]:
                a.axvline(history[i]["epoch"] - 0.5, color="grey", ls="--", lw=1)
            ax.text(history[i]["epoch"] - 0.4, ax.get_ylim()[1], history[i]["stage"], va="top", fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    if has_acc:
        acc_ax = axes[0][1]
        for key, name in (("val_accuracy", "accuracy"), ("val_balanced_accuracy", "balanced accuracy")):
            acc_ax.plot(epochs, [r.get(key, np.nan) for r in history], "o-", ms=3, label=name)
        acc_ax.set_ylim(0, 1)
        acc_ax.set_xlabel("epoch")
        acc_ax.set_title("validation")
        acc_ax.legend()
        acc_ax.grid(alpha=0.3)
    return _save(fig, path)


def reconstruction_grid(inputs: np.ndarray, outputs: np.ndarray, path: Path, title: str = "") -> Path:
    """Rows: input, reconstruction, |difference|; one column per image. Arrays are (N, H, W) in [0, 1]."""

    n = len(inputs)
    fig = Figure(figsize=(1.8 * n, 5.6))
    axes = fig.subplots(3, n, squeeze=False)
    for j in range(n):
        diff = np.abs(inputs[j] - outputs[j])
        for i, (img, vmax) in enumerate(((inputs[j], 1.0), (np.clip(outputs[j], 0, 1), 1.0), (diff, 0.5))):
            ax = axes[i][j]
            ax.imshow(img, cmap="gray" if i < 2 else "magma", vmin=0.0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(("input", "reconstruction", "|difference|")[i])
        axes[2][j].set_xlabel(f"MSE {float(np.mean((inputs[j] - outputs[j]) ** 2)):.4f}", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
