"""``classify``: one label per image from any class set (COVID / NORMAL / PNEUMONIA, KL grades ``0``..``4``).

Cross-entropy on logits (class-weighted with ``--balance loss``); probabilities are ``softmax(logits / T)``
with the checkpoint's calibrated temperature T (``cxrcae calibrate``; 1 when never calibrated). Validation
reports accuracy, balanced accuracy (macro recall) and macro F1.

Evaluation: the paper's metrics per class and macro/weighted with patient-bootstrap intervals, calibration
(ECE in ``--bins`` bins, NLL, Brier; with a stored temperature also the ECE before it) from
``cxrcae.metrics.full_report``; images whose label is empty are left out (noted), a label that is not a class
of the model is refused. Prediction: the arg-max class, its probability, every class's probability and the
``top_k`` classes; below ``threshold``, or when the screen flags the input, the label is "uncertain".
Only classify has Grad-CAM (``explain``), ONNX export and backends (``onnx``), temperature scaling
(``calibrate``) and the web server (``serve``).
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
from cxrcae.data.records import Record, check_labels, class_names
from cxrcae.errors import CheckpointError, DataError
from cxrcae.io.decoded import DecodedCache
from cxrcae.metrics import (
    DEFAULT_BINS,
    classification_metrics,
    expected_calibration_error,
    fmt_ci,
    full_report,
    softmax,
)
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
UNCERTAIN = "uncertain"
"""The label of an answer below ``--threshold`` or flagged out of distribution (``top_class`` stays)."""
METRIC_COLUMNS = ("precision", "recall", "specificity", "f1", "auc")
PROB_PREFIX = "prob_"
"""CSV column of one class's probability: ``prob_COVID``."""


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
    output_key = "class_names"
    description = "single-label image classification"
    pipeline_tag = "image-classification"
    metric_names = Classification.monitor_metrics
    options = frozenset({"top_k", "threshold", "explain", "onnx", "calibrate", "bins", "serve"})

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
        """Class probabilities ``softmax(logits / T)``, T the checkpoint's calibrated temperature.

        Logits as a tensor (predict's batches) give float32 probabilities, as torch computes them: a logit
        one float32 step off (the same image in a batch of another size) then gives the same row, so a
        resumed ``predict --output`` file equals an uninterrupted one byte for byte. Logits as an array
        (evaluate's) give float64 probabilities, which the metrics are computed from."""
        temperature = model_temperature(config)
        if isinstance(outputs, torch.Tensor):
            return torch.softmax(outputs.detach().float() / temperature, dim=1).cpu().numpy()
        return softmax(_numpy(outputs), temperature)

    def card_summary(self, config: dict[str, Any]) -> str:
        names = config.get("class_names") or []
        return f"Classifies an X-ray into one of {len(names)} classes: {', '.join(map(str, names))}."

    # ------------------------------------------------------------------------------ evaluation

    def evaluation_records(
        self, records: Sequence[Record], config: dict[str, Any], where: str | Path
    ) -> tuple[list[Record], list[str]]:
        """Unlabelled rows dropped (noted); labels the model does not know refused; absent classes noted."""
        return check_labels(records, config["class_names"], where)

    def targets(self, records: Sequence[Record], config: dict[str, Any]) -> np.ndarray:
        """Class indices of the records' ``label`` column."""
        index = {n: i for i, n in enumerate(config["class_names"])}
        for r in records:
            if r.label not in index:
                raise DataError(
                    f"{r.path}: column 'label' is {r.label!r}, not a class of the model ({', '.join(index)})"
                )
        return np.array([index[r.label] for r in records], dtype=np.int64)

    def score(
        self,
        probabilities: np.ndarray,
        targets: np.ndarray,
        groups: Sequence[str],
        config: dict[str, Any],
        *,
        n_boot: int = 1000,
        seed: int = 0,
        bins: int = DEFAULT_BINS,
    ) -> dict[str, Any]:
        """``cxrcae.metrics.full_report``: per class, macro and weighted metrics, calibration, CIs."""
        return full_report(
            targets,
            probabilities,
            config["class_names"],
            groups=groups,
            n_resamples=n_boot,
            seed=seed,
            n_bins=bins,
        )

    def score_outputs(
        self,
        outputs: np.ndarray,
        targets: np.ndarray,
        groups: Sequence[str],
        config: dict[str, Any],
        *,
        n_boot: int = 1000,
        seed: int = 0,
        bins: int = DEFAULT_BINS,
    ) -> dict[str, Any]:
        """``score``, plus the temperature used and, when it is not 1, the ECE the logits had without it."""
        temperature = model_temperature(config)
        metrics = self.score(
            self.probabilities(outputs, config), targets, groups, config, n_boot=n_boot, seed=seed, bins=bins
        )
        metrics["calibration"]["temperature"] = temperature
        if temperature != 1.0:
            metrics["calibration"]["ece_uncalibrated"] = expected_calibration_error(
                targets, softmax(_numpy(outputs)), bins
            )
        return metrics

    def metric_rows(self, metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        """Per class, then macro and weighted, each value with its 95% CI."""
        ci = metrics.get("ci") or {}
        columns = ["class", "n", "precision", "recall (sens.)", "specificity", "F1", "ROC AUC"]
        rows = []
        for name, values in metrics["per_class"].items():
            cis = (ci.get("per_class") or {}).get(name, {})
            rows.append(
                [name, str(values["support"]), *(fmt_ci(values[m], cis.get(m)) for m in METRIC_COLUMNS)]
            )
        for kind in ("macro", "weighted"):
            cis = ci.get(kind, {})
            rows.append(
                [
                    f"{kind} avg",
                    str(metrics["n"]),
                    *(fmt_ci(metrics[kind][m], cis.get(m)) for m in METRIC_COLUMNS),
                ]
            )
        return columns, rows

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        """Accuracy and ECE with their intervals, NLL, Brier, and the temperature when there is one."""
        ci = metrics.get("ci") or {}
        cal = metrics["calibration"]
        items = [
            ("accuracy", fmt_ci(metrics["accuracy"], ci.get("accuracy"))),
            ("ECE", fmt_ci(cal["ece"], ci.get("ece"))),
            ("NLL", f"{cal['nll']:.4f}"),
            ("Brier", f"{cal['brier']:.4f}"),
        ]
        if cal.get("temperature", 1.0) != 1.0:
            items.append(
                (
                    "temperature",
                    f"{cal['temperature']:.3f} (uncalibrated ECE {cal.get('ece_uncalibrated', 0):.4f})",
                )
            )
        return items

    def evaluation_row(
        self,
        row: dict[str, Any],
        record: Record,
        probabilities: np.ndarray | None,
        config: dict[str, Any],
    ) -> dict[str, Any]:
        """path, label, ..., status, predicted, correct, confidence, reason, then each class's probability."""
        names = config["class_names"]
        middle = {k: v for k, v in row.items() if k not in ("path", "status", "reason")}
        out: dict[str, Any] = {"path": row["path"], "label": record.label, **middle, "status": row["status"]}
        if probabilities is None:
            out.update(predicted="", correct="", confidence="", reason=row.get("reason", ""))
            out.update({f"{PROB_PREFIX}{n}": "" for n in names})
            return out
        predicted = names[int(probabilities.argmax())]
        out.update(
            predicted=predicted,
            correct=predicted == record.label,
            confidence=float(probabilities.max()),
            reason=row.get("reason", ""),
        )
        out.update({f"{PROB_PREFIX}{n}": float(probabilities[c]) for c, n in enumerate(names)})
        return out

    # ------------------------------------------------------------------------------ prediction

    def prediction_columns(self, config: dict[str, Any]) -> list[str]:
        names = config["class_names"]
        return ["label", "probability", "top_class", *(f"{PROB_PREFIX}{n}" for n in names), "top_k"]

    def prediction_row(
        self,
        probabilities: np.ndarray,
        config: dict[str, Any],
        *,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        """label (``UNCERTAIN`` below ``threshold``), probability, top_class, probabilities (a dict by class)
        and top_k ((class, probability) pairs, most likely first; every class unless ``top_k``)."""
        names = config["class_names"]
        k = len(names) if top_k is None else max(1, min(int(top_k), len(names)))
        order = probabilities.argsort()[::-1]
        best = int(order[0])
        p_best = float(probabilities[best])
        return {
            "label": names[best] if threshold is None or p_best >= threshold else UNCERTAIN,
            "probability": p_best,
            "top_class": names[best],
            "probabilities": {n: float(probabilities[i]) for i, n in enumerate(names)},
            "top_k": [(names[int(i)], float(probabilities[int(i)])) for i in order[:k]],
        }

    def prediction_blank(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"label": None, "probability": None, "top_class": None, "probabilities": {}, "top_k": []}

    def prediction_cells(self, values: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        """Each class's probability in its own ``prob_<class>`` column; top_k as ``class:p;class:p``."""
        probs = values.get("probabilities") or {}
        cells = {c: values.get(c) for c in ("label", "probability", "top_class")}
        cells.update({f"{PROB_PREFIX}{n}": probs.get(n) for n in config["class_names"]})
        cells["top_k"] = ";".join(f"{name}:{p!r}" for name, p in values.get("top_k") or [])
        return cells

    def prediction_display(
        self, values: dict[str, Any], config: dict[str, Any], *, top_k: int | None = None, **_: Any
    ) -> dict[str, Any]:
        """prediction (``label (top_class)`` when they differ), each class's probability, and the top
        classes as a note when ``top_k`` was asked for."""
        label, top = values["label"], values["top_class"]
        cells: dict[str, Any] = {"prediction": label if label == top else f"{label} ({top})"}
        cells.update({n: values["probabilities"][n] for n in config["class_names"]})
        cells["note"] = ", ".join(f"{n} {v:.2f}" for n, v in values["top_k"]) if top_k else ""
        return cells

    def flag_uncertain(self, values: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        return {**values, "label": UNCERTAIN}

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
