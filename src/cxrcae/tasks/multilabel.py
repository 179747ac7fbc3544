"""``multilabel``: several findings per image (NIH ChestX-ray14's 14, ieee8023's ``Viral/COVID-19``).

One sigmoid per label over the classifier's encoder and head; binary cross-entropy, optionally with each
label's positives weighted by its negatives/positives ratio (``--balance loss``). A decision threshold per
label is chosen on the validation split (the F1-best cut, ``cxrcae.metrics.choose_thresholds``) at the best
epoch and stored in config.json as ``thresholds``. Labels come from one column of separated names
(``--labels finding --label-sep /``) or from 0/1 columns (``--label-columns A,B,C``); config.json keeps
where (``label_source``), so evaluate reads test labels the same way. Validation reports macro AUC, micro
AUC and macro F1; evaluation adds per-label AUC, average precision and F1 with patient-bootstrap CIs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrcae.data.dataset import XrayDataset
from cxrcae.data.labels import LabelSource, check_train_labels, label_source, targets_for
from cxrcae.data.records import Record
from cxrcae.errors import CheckpointError, DataError
from cxrcae.io.decoded import DecodedCache
from cxrcae.metrics import choose_thresholds, multilabel_metrics, multilabel_report
from cxrcae.models.cae import CAEEncoder
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

MAX_LABELS = 1000


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    z = np.asarray(logits, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


class MultiLabelBCE(Objective):
    """Binary cross-entropy per label (``pos_weight`` per label with ``--balance loss``); validation
    macro/micro AUC and macro F1 at thresholds chosen on that same validation pass."""

    name = "binary_cross_entropy"
    monitor_metrics = ("val_macro_auc", "val_micro_auc", "val_macro_f1")

    def __init__(self, label_names: Sequence[str], pos_weight: torch.Tensor | None = None):
        self.label_names = list(label_names)
        self.pos_weight = pos_weight
        self._probs: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        self._thresholds: list[float] | None = None

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        logits = model(images)
        weight = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=weight)
        return loss, logits

    def start_validation(self) -> None:
        self._probs, self._targets = [], []

    def observe(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self._probs.append(torch.sigmoid(outputs.float()).cpu().numpy())
        self._targets.append(targets.cpu().numpy())

    def epoch_metrics(self, stats: EpochOutputs) -> dict[str, Any]:
        if not self._probs:
            return {}
        probs, y = np.concatenate(self._probs), np.concatenate(self._targets)
        thresholds = choose_thresholds(y, probs)
        self._thresholds = [float(t) for t in thresholds]
        m = multilabel_metrics(y, probs, self.label_names, thresholds)
        return {
            "val_macro_auc": m["macro"]["auc"],
            "val_micro_auc": m["micro"]["auc"],
            "val_macro_f1": m["macro"]["f1"],
        }

    def epoch_fields(self) -> dict[str, Any]:
        return {"thresholds": self._thresholds} if self._thresholds is not None else {}


class MultiLabel(Task):
    name = "multilabel"
    kind = "multilabel"
    output_key = "label_names"
    description = "multi-label finding detection (one probability per label)"
    pipeline_tag = "image-classification"
    metric_names = MultiLabelBCE.monitor_metrics
    balance_modes = ("none", "loss")

    def build(self, config: dict[str, Any]) -> nn.Module:
        names = config.get("label_names") or []
        if not names:
            raise CheckpointError("multilabel config.json needs label_names")
        head = build_head(config.get("head", "lstm"), len(names), int(config["image_size"]))
        return CXRClassifier(CAEEncoder(int(config.get("in_chans", 3))), head)

    def example(self, image_size: int = 32) -> tuple[dict[str, Any], torch.Tensor]:
        config = {"task": self.name, "kind": self.kind, "head": "dense5", "image_size": image_size}
        source = {"column": "finding", "sep": "/"}
        config = {**config, "label_names": ["COVID-19", "Pneumonia", "Viral"], "label_source": source}
        return config, torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])

    def validate_config(self, config: dict[str, Any], where: str | Path) -> None:
        if "image_size" not in config:
            raise CheckpointError(f"{where}: missing field 'image_size'")
        head = config.get("head")
        if head is not None and head not in HEADS:
            raise CheckpointError(f"{where}: field 'head' must be one of {', '.join(HEADS)}, got {head!r}")
        names = check_class_names(config, where, "label_names", 1, MAX_LABELS)
        thresholds = config.get("thresholds")
        ok = thresholds is None or (
            isinstance(thresholds, list)
            and len(thresholds) == len(names)
            and all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in thresholds)
        )
        if not ok:
            raise CheckpointError(f"{where}: field 'thresholds' must list one number in [0, 1] per label")

    def objective(self, config: dict[str, Any], weight: torch.Tensor | None = None, **_: Any) -> Objective:
        return MultiLabelBCE(config["label_names"], weight)

    def probabilities(self, outputs: torch.Tensor | np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """One independent probability per label: ``sigmoid(logits)``."""
        return sigmoid(_numpy(outputs))

    def card_summary(self, config: dict[str, Any]) -> str:
        names = config.get("label_names") or []
        return f"Detects {len(names)} findings, each with its own probability: {', '.join(map(str, names))}."

    def thresholds(self, config: dict[str, Any]) -> np.ndarray:
        """The stored per-label thresholds (0.5 where the model was never validated)."""
        stored = config.get("thresholds")
        return np.asarray(stored if stored else [0.5] * len(config["label_names"]), dtype=np.float64)

    # ------------------------------------------------------------------------------ evaluation

    def targets(self, records: Sequence[Record], config: dict[str, Any]) -> np.ndarray:
        source = _stored_source(config)
        found = targets_for(records, source, config["label_names"], "evaluation data")
        if len(found.records) != len(records):
            missing = [r.path.name for r in records if r not in set(found.records)][:3]
            raise DataError(f"evaluation data: no labels in {source.describe()} for {', '.join(missing)}")
        return found.targets

    def score(
        self,
        probabilities: np.ndarray,
        targets: np.ndarray,
        groups: Sequence[str],
        config: dict[str, Any],
        *,
        n_boot: int = 1000,
        seed: int = 0,
    ) -> dict[str, Any]:
        return multilabel_report(
            targets,
            probabilities,
            config["label_names"],
            self.thresholds(config),
            groups=list(groups),
            n_resamples=n_boot,
            seed=seed,
        )

    def metric_rows(self, metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        ci = metrics.get("ci", {})
        rows = []
        for name, values in metrics["per_label"].items():
            rows.append(
                [name, *(_fmt(values[m], ci.get("per_label", {}).get(name, {}).get(m)) for m in _SHOWN)]
            )
        for avg in ("macro", "micro"):
            rows.append([avg, *(_fmt(metrics[avg][m], ci.get(avg, {}).get(m)) for m in _SHOWN)])
        return ["label", "AUC", "AP", "F1"], rows

    # ------------------------------------------------------------------------------ prediction

    def prediction_columns(self, config: dict[str, Any]) -> list[str]:
        return ["findings", *(f"p_{n}" for n in config["label_names"])]

    def prediction_row(self, probabilities: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
        names, cut = config["label_names"], self.thresholds(config)
        found = [n for n, p, t in zip(names, probabilities, cut, strict=True) if p >= t]
        row = {"findings": "|".join(found)}
        row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, probabilities, strict=True)})
        return row

    # ------------------------------------------------------------------------------ fine-tuning on labels

    def target_fields(
        self, train: Sequence[Record], val: Sequence[Record], source: TargetSource, where: str
    ) -> dict[str, Any]:
        """``label_names`` (sorted names of a separated column, or the 0/1 columns in the order given),
        each with a positive training image; ``label_source`` for evaluation."""
        labels = _label_source(source)
        names = _all_names([*train, *val], labels, where)
        found_train, found_val = (targets_for(part, labels, names, where) for part in (train, val))
        splits = ["train"] * len(found_train.records) + ["val"] * len(found_val.records)
        check_train_labels(np.concatenate([found_train.targets, found_val.targets]), names, splits, where)
        return {"label_names": names, "label_source": labels.describe()}

    def dataset(
        self,
        records: Sequence[Record],
        config: dict[str, Any],
        transform: Transform | None = None,
        decoded: DecodedCache | None = None,
    ) -> XrayDataset:
        found = targets_for(records, _stored_source(config), config["label_names"], "training data")
        targets = [torch.from_numpy(row.astype(np.float32)) for row in found.targets]
        size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
        return XrayDataset(found.records, size, mode, [], transform, decoded, targets=targets)

    def weighting(self, dataset: XrayDataset, records: Sequence[Record], balance: str) -> Weighting:
        """``loss``: each label's positives weighted by negatives / positives (BCE ``pos_weight``)."""
        super().weighting(dataset, records, balance)
        if balance != "loss":
            return Weighting()
        y = _targets_of(dataset)
        positives = y.sum(0).clamp_min(1)
        return Weighting(loss_weight=((len(y) - positives) / positives).float())


_SHOWN = ("auc", "ap", "f1")


def _fmt(value: float, interval: Sequence[float] | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if interval and all(np.isfinite(interval)):
        return f"{value:.3f} ({interval[0]:.2f}-{interval[1]:.2f})"
    return f"{value:.3f}"


def _label_source(source: TargetSource) -> LabelSource:
    if source.masks:
        raise DataError("--masks is for --task segment, not multilabel")
    if not source.labels and not source.label_columns:
        raise DataError("--task multilabel needs --labels COLUMN (with --label-sep) or --label-columns A,B,C")
    return LabelSource.from_options(list(source.label_columns), source.labels, source.label_sep)


def _stored_source(config: dict[str, Any]) -> LabelSource:
    described = config.get("label_source")
    if not isinstance(described, dict):
        raise DataError("this multilabel model does not say where its labels come from (label_source)")
    return label_source(described)


def _all_names(records: Sequence[Record], labels: LabelSource, where: str) -> list[str]:
    """Every label name the records use: the 0/1 columns as given, or the distinct separated names."""
    if labels.column is None:
        return list(labels.columns)
    names = {t.strip() for r in records for t in (r.value(labels.column) or "").split(labels.sep)} - {""}
    if not names:
        raise DataError(f"{where}: column {labels.column!r} is empty in every training row")
    return sorted(names)


def _targets_of(dataset: XrayDataset) -> torch.Tensor:
    targets = dataset.targets
    return torch.stack(targets) if targets else torch.zeros(0, 1)
