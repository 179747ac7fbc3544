"""One training epoch and one evaluation pass: plain PyTorch, readable in one sitting.

The objective (reconstruction MSE or cross-entropy) is a small callable, so pretraining and fine-tuning
share this loop. Losses are computed in fp32 even under bf16/fp16 autocast; a non-finite loss stops the run
at once with an error naming the epoch and step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrcae.errors import CxrcaeError
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast
from cxrcae.train.unfreeze import train_mode


class NonFiniteLossError(CxrcaeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass(frozen=True)
class Runtime:
    """Where tensors live and how they are computed: device, autocast dtype (None = fp32), memory format."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"].to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class Reconstruction:
    """Autoencoder objective: mean squared error between reconstruction and input."""

    name = "mse"

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        out = model(images)
        return F.mse_loss(out.float(), images.float()), out


class Classification:
    """Cross-entropy on logits, optionally class-weighted (``--balance loss``)."""

    name = "cross_entropy"

    def __init__(self, n_classes: int, weight: torch.Tensor | None = None):
        self.n_classes = n_classes
        self.weight = weight

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        weight = self.weight.to(logits.device) if self.weight is not None else None
        return F.cross_entropy(logits.float(), labels, weight=weight), logits


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    skipped: list[str] = field(default_factory=list)
    confusion: torch.Tensor | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _batches(loader: Iterable, limit: int | None):
    for step, batch in enumerate(loader, start=1):
        if limit is not None and step > limit:
            return
        yield step, batch


def _check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss became {value} at {where}")


def _forward_batches(model, loader, objective, rt: Runtime, limit: int | None, skipped: list[str], what: str):
    """Readable batches through ``objective`` under autocast: (step, n, loss, loss value, outputs, labels).

    Unreadable files are appended to ``skipped``; a non-finite loss stops the run naming ``what`` and step.
    """
    for step, batch in _batches(loader, limit):
        skipped += batch.get("skipped", [])
        if len(batch["image"]) == 0:
            continue
        images = rt.images(batch)
        labels = batch["label"].to(rt.device, non_blocking=True)
        with autocast(rt.device, rt.dtype):
            loss, out = objective(model, images, labels)
        value = loss.item()
        _check_finite(value, f"{what} step {step}")
        yield step, len(images), loss, value, out, labels


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    objective,
    optimizer: torch.optim.Optimizer,
    rt: Runtime,
    *,
    where: str,
    limit_batches: int | None = None,
    total: int | None = None,
    progress: ProgressFn = no_progress,
    task: str = "train",
) -> EpochStats:
    """One pass over ``loader``; frozen modules stay in eval mode (see ``train_mode``)."""
    train_mode(model)
    loss_sum, seen, skipped = 0.0, 0, []
    start = time.perf_counter()
    batches = _forward_batches(model, loader, objective, rt, limit_batches, skipped, f"{where}, training")
    for step, n, loss, value, _, _ in batches:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += value * n
        seen += n
        rate = seen / max(time.perf_counter() - start, 1e-9)
        progress(task, step, total, f"train loss {loss_sum / seen:.4g} · {rate:.1f} img/s")
    seconds = time.perf_counter() - start
    if seen == 0:
        raise CxrcaeError(f"{where}: no training image could be read")
    return EpochStats(loss_sum / seen, seen, seconds, skipped)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    objective,
    rt: Runtime,
    *,
    where: str = "validation",
    limit_batches: int | None = None,
    progress: ProgressFn = no_progress,
    task: str = "validate",
    offset: int = 0,
    total: int | None = None,
) -> EpochStats:
    """Mean loss (and a confusion matrix for classification) in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    n_classes = getattr(objective, "n_classes", None)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long) if n_classes else None
    loss_sum, seen, skipped = 0.0, 0, []
    start = time.perf_counter()
    try:
        batches = _forward_batches(
            model, loader, objective, rt, limit_batches, skipped, f"{where}, validation"
        )
        for step, n, _, value, out, labels in batches:
            loss_sum += value * n
            seen += n
            if confusion is not None:
                pred = out.float().argmax(dim=1).cpu()
                index = labels.cpu() * n_classes + pred
                confusion += torch.bincount(index, minlength=n_classes * n_classes).view(n_classes, n_classes)
            progress(task, offset + step, total, f"val loss {loss_sum / seen:.4g}")
    finally:
        model.train(was_training)
    if seen == 0:
        raise CxrcaeError(f"{where}: no validation image could be read")
    return EpochStats(loss_sum / seen, seen, time.perf_counter() - start, skipped, confusion)


def classification_metrics(confusion: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall), macro F1 and per-class recall from a confusion matrix."""
    cm = confusion.double()
    true = cm.sum(1)
    pred = cm.sum(0)
    hits = cm.diag()
    recall = torch.where(true > 0, hits / true.clamp(min=1), torch.nan)
    precision = torch.where(pred > 0, hits / pred.clamp(min=1), torch.zeros_like(hits))
    f1 = torch.where(
        (precision + recall.nan_to_num()) > 0,
        2 * precision * recall.nan_to_num() / (precision + recall.nan_to_num()).clamp(min=1e-12),
        torch.zeros_like(hits),
    )
    present = true > 0
    total = cm.sum().item()
    return {
        "accuracy": hits.sum().item() / total if total else float("nan"),
        "balanced_accuracy": recall[present].mean().item() if present.any() else float("nan"),
        "macro_f1": f1[present].mean().item() if present.any() else float("nan"),
        "recall": {name: (None if math.isnan(r) else r) for name, r in zip(class_names, recall.tolist())},
        "confusion": confusion.tolist(),
    }
