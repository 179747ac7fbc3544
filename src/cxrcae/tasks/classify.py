"""``classify``: one label per image from any class set (COVID / NORMAL / PNEUMONIA, KL grades ``0``..``4``).

Cross-entropy on logits (class-weighted with ``--balance loss``); probabilities are ``softmax(logits / T)``
with the checkpoint's calibrated temperature T (``cxrcae calibrate``; 1 when never calibrated). Validation
reports accuracy, balanced accuracy (macro recall) and macro F1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrcae.errors import CheckpointError
from cxrcae.metrics import classification_metrics
from cxrcae.models.cae import CAEEncoder
from cxrcae.models.classifier import CXRClassifier
from cxrcae.models.heads import HEADS, build_head
from cxrcae.tasks.base import EpochOutputs, Objective, Task, _numpy, check_class_names

MAX_CLASSES = 1000


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` along the last axis."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def model_temperature(config: dict[str, Any]) -> float:
    """The temperature a checkpoint asks for (1.0 when never calibrated)."""
    value = config.get("temperature", 1.0)
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json temperature must be a number, got {value!r}") from None
    if not (t > 0 and np.isfinite(t)):
        raise CheckpointError(f"config.json temperature must be a positive number, got {value!r}")
    return t


class Classification(Objective):
    """Cross-entropy on logits, optionally class-weighted; validation accuracy, balanced accuracy and
    macro F1 from ``cxrcae.metrics``."""

    name = "cross_entropy"
    monitor_metrics = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1")

    def __init__(self, class_names: list[str], weight: torch.Tensor | None = None):
        self.class_names = list(class_names)
        self.weight = weight
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        weight = self.weight.to(logits.device) if self.weight is not None else None
        return F.cross_entropy(logits.float(), labels, weight=weight), logits

    def start_validation(self) -> None:
        self._probs, self._labels = [], []

    def observe(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self._probs.append(torch.softmax(outputs.float(), dim=1).cpu().numpy())
        self._labels.append(targets.cpu().numpy())

    def epoch_metrics(self, stats: EpochOutputs) -> dict[str, Any]:
        if not self._probs:
            return {}
        probs, labels = np.concatenate(self._probs), np.concatenate(self._labels)
        m = classification_metrics(labels, probs, self.class_names)
        return {
            "val_accuracy": m["accuracy"],
            "val_balanced_accuracy": m["macro"]["recall"],
            "val_macro_f1": m["macro"]["f1"],
        }


class Classify(Task):
    name = "classify"
    kind = "classifier"
    description = "single-label image classification"
    metric_names = Classification.monitor_metrics

    def build(self, config: dict[str, Any]) -> nn.Module:
        names = config.get("class_names") or []
        if len(names) < 2:
            raise CheckpointError("classifier config.json needs at least two class_names")
        head = build_head(config.get("head", "lstm"), len(names), int(config["image_size"]))
        return CXRClassifier(CAEEncoder(int(config.get("in_chans", 3))), head)

    def validate_config(self, config: dict[str, Any], where: str | Path) -> None:
        if "image_size" not in config:
            raise CheckpointError(f"{where}: missing field 'image_size'")
        head = config.get("head")
        if head is not None and head not in HEADS:
            raise CheckpointError(f"{where}: field 'head' must be one of {', '.join(HEADS)}, got {head!r}")
        check_class_names(config, where, "class_names", 2, MAX_CLASSES)

    def objective(self, config: dict[str, Any], weight: torch.Tensor | None = None, **_: Any) -> Objective:
        return Classification(config["class_names"], weight)

    def probabilities(self, outputs: torch.Tensor | np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """Class probabilities ``softmax(logits / T)``, T the checkpoint's calibrated temperature."""
        return softmax(_numpy(outputs), model_temperature(config))

    def card_summary(self, config: dict[str, Any]) -> str:
        names = config.get("class_names") or []
        return f"Classifies an X-ray into one of {len(names)} classes: {', '.join(map(str, names))}."
