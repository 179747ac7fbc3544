"""``classify``: one label per image from any class set (COVID / NORMAL / PNEUMONIA, KL grades ``0``..``4``).

Cross-entropy on logits (class-weighted with ``--balance loss``); probabilities are ``softmax(logits / T)``
with the checkpoint's calibrated temperature T (``cxrcae calibrate``; 1 when never calibrated). Validation
reports accuracy, balanced accuracy (macro recall) and macro F1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrcae.data.balance import class_weights, source_balanced_weights
from cxrcae.data.dataset import XrayDataset
from cxrcae.data.records import Record, class_names
from cxrcae.errors import CheckpointError, DataError
from cxrcae.io.decoded import DecodedCache
from cxrcae.metrics import classification_metrics, softmax
from cxrcae.models.cae import CAEEncoder
from cxrcae.models.checkpoint import model_temperature
from cxrcae.models.classifier import CXRClassifier
from cxrcae.models.heads import HEADS, build_head
from cxrcae.tasks.base import (
    EpochOutputs,
    Objective,
    TargetSource,
    Task,
    Transform,
    Weighting,
    _numpy,
    check_class_names,
)

MAX_CLASSES = 1000


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

    def example(self, image_size: int = 32) -> tuple[dict[str, Any], torch.Tensor]:
        config = {"task": self.name, "kind": self.kind, "head": "dense5", "image_size": image_size}
        return {**config, "class_names": ["0", "1", "2"]}, torch.tensor([0, 2])

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

    def targets(self, records: Sequence[Record], config: dict[str, Any]) -> np.ndarray:
        """Each record's class index in ``class_names``; a label the model does not know is an error."""
        index = {name: i for i, name in enumerate(config["class_names"])}
        unknown = sorted({str(r.label) for r in records if r.label not in index})
        if unknown:
            raise DataError(
                f"label(s) {', '.join(unknown)} are not among the model's classes "
                f"({', '.join(config['class_names'])})"
            )
        return np.asarray([index[r.label] for r in records], dtype=np.int64)

    # ------------------------------------------------------------------------------ fine-tuning on labels

    uses_label_column = True
    balance_modes = ("none", "loss", "sampler", "source")

    def target_fields(
        self, train: Sequence[Record], val: Sequence[Record], source: TargetSource, where: str
    ) -> dict[str, Any]:
        """``class_names``: the sorted labels of the training records (any names: ``0``..``4`` work)."""
        names = class_names(train)
        if len(names) < 2:
            raise DataError(f"{where}: need at least two classes in the train split, found {names}")
        unknown = sorted({r.label for r in val if r.label not in names})
        if unknown:
            raise DataError(f"{where}: validation labels absent from the train split: {', '.join(unknown)}")
        return {"class_names": names}

    def dataset(
        self,
        records: Sequence[Record],
        config: dict[str, Any],
        transform: Transform | None = None,
        decoded: DecodedCache | None = None,
    ) -> XrayDataset:
        size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
        return XrayDataset(records, size, mode, config["class_names"], transform, decoded)

    def weighting(self, dataset: XrayDataset, records: Sequence[Record], balance: str) -> Weighting:
        """``loss``: class-weighted cross-entropy; ``sampler``: sampling weights per class; ``source``: per
        class and, inside a class, per source (``cxrcae.data.balance``)."""
        super().weighting(dataset, records, balance)
        labels, n = dataset.labels, len(dataset.class_names)
        if balance == "loss":
            return Weighting(loss_weight=class_weights(labels, n))
        if balance == "sampler":
            per_class = class_weights(labels, n)
            return Weighting(
                sample_weights=torch.tensor([per_class[i].item() for i in labels], dtype=torch.double)
            )
        if balance == "source":
            return Weighting(sample_weights=source_balanced_weights(labels, [r.source for r in records]))
        return Weighting()

    def training_notes(self, train: Sequence[Record], balance: str) -> list[str]:
        counts = Counter(r.label for r in train)
        if balance == "none" and counts and max(counts.values()) > 3 * min(counts.values()):
            return ["classes are imbalanced (>3x); consider --balance loss or --balance sampler"]
        return []
