"""Paired bootstrap comparison of two models scored on the same test images.

Two separate confidence intervals that overlap say little about which model is better; the question is the
interval of the **difference**. Each resample draws patients (or images, when patient ids are unknown) once
and scores both models on that same draw, so the variation the two share (which patients happen to be
easy) cancels out. That is what makes the paired interval much narrower than two unpaired ones.

A model's test outputs are kept as ``Scores``, whose kind decides the headline metrics:

- ``classes`` (one label per image; class probabilities): accuracy, macro F1, macro AUC;
- ``labels`` (multi-label; per-label probabilities and thresholds): macro AUC, macro AP, micro AUC, macro F1;
- ``masks`` (segmentation; each image's Dice per structure, at a 0.5 cut of the predicted masks): mean
  Dice and the Dice of each structure.

``Scores.headline`` gives one model's figures with percentile intervals from the same resamples
``compare`` pairs, so a table's intervals and its differences come from one bootstrap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrcae._atomic import atomic_open
from cxrcae.errors import CxrcaeError
from cxrcae.metrics import _interval, _multilabel_replicates, _replicate_metrics, resample_weights

COMPARED = {"accuracy": "accuracy", "macro_f1": "macro:f1", "macro_auc": "macro:auc"}
"""Single-label: reported name -> key of the bootstrap replicate metrics."""
LABEL_COMPARED = {
    "macro_auc": "macro:auc",
    "macro_ap": "macro:ap",
    "micro_auc": "micro:auc",
    "macro_f1": "macro:f1",
}
"""Multi-label: reported name -> key of ``metrics._multilabel_replicates``."""
KINDS = ("classes", "labels", "masks")
MASK_CUT = 0.5

Replicates = Callable[[np.ndarray], dict[str, np.ndarray]]
"""(B, n) resample weights -> reported metric -> (B,) values."""


def paired_bootstrap(
    y_true: Sequence[int],
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    *,
    groups: Sequence[str | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """``a - b`` for accuracy, macro F1 and macro AUC: point estimate, paired percentile CI, and the share of
    resamples in which ``a`` is not better (a one-sided bootstrap p-value for "a beats b").

    Both probability arrays must be rows of the same images in the same order as ``y_true``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    a, b = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != y.size:
        raise ValueError(f"paired scores need equal (n, classes) arrays for {y.size} labels")
    return paired_replicates(
        class_replicates(y, a),
        class_replicates(y, b),
        y.size,
        groups=groups,
        n_resamples=n_resamples,
        seed=seed,
        level=level,
    )


def paired_replicates(
    rep_a: Replicates,
    rep_b: Replicates,
    n: int,
    *,
    groups: Sequence[str | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """``a - b`` for every metric the two replicate functions report, on one shared set of resamples."""
    has_groups = _has_groups(groups)
    full = np.ones((1, n))
    point_a, point_b = rep_a(full), rep_b(full)
    weights = resample_weights(n, n_resamples, seed, groups if has_groups else None)
    reps_a, reps_b = rep_a(weights), rep_b(weights)
    out: dict[str, Any] = {}
    for name in point_a:
        diff = reps_a[name] - reps_b[name]
        valid = diff[~np.isnan(diff)]
        out[name] = {
            "a": _scalar(point_a[name]),
            "b": _scalar(point_b[name]),
            "difference": _scalar(point_a[name] - point_b[name]),
            "ci": list(_interval(diff, level)),
            "p_a_not_better": float((valid <= 0).mean()) if valid.size else None,
        }
    out.update(_about(n, n_resamples, has_groups, level, seed))
    return out


def class_replicates(y: np.ndarray, probs: np.ndarray) -> Replicates:
    """Accuracy, macro F1 and macro AUC of class probabilities, per resample."""

    def replicate(weights: np.ndarray) -> dict[str, np.ndarray]:
        reps = _replicate_metrics(weights, y, probs)
        return {name: reps[key] for name, key in COMPARED.items()}

    return replicate


def label_replicates(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> Replicates:
    """Macro AUC, macro AP, micro AUC and macro F1 (at ``thresholds``) of per-label probabilities."""
    positive, pred = y.astype(bool), probs >= thresholds[None, :]

    def replicate(weights: np.ndarray) -> dict[str, np.ndarray]:
        reps = _multilabel_replicates(weights, positive, probs, pred)
        return {name: reps[key] for name, key in LABEL_COMPARED.items()}

    return replicate


def mask_replicates(dice: np.ndarray, names: Sequence[str]) -> Replicates:
    """Mean Dice over images (and structures), and each structure's, from per-image Dice (n, S)."""

    def replicate(weights: np.ndarray) -> dict[str, np.ndarray]:
        total = weights.sum(axis=1)
        per = (weights @ dice) / np.where(total > 0, total, np.nan)[:, None]
        return {"dice": per.mean(axis=1), **{f"dice_{n}": per[:, k] for k, n in enumerate(names)}}

    return replicate


def dice_per_image(probs: np.ndarray, targets: np.ndarray, cut: float = MASK_CUT) -> np.ndarray:
    """(n, S, H, W) mask probabilities and 0/1 targets -> (n, S) Dice of ``probs >= cut``; 1 where both
    the prediction and the target are empty."""
    pred, true = probs >= cut, targets.astype(bool)
    axes = tuple(range(2, pred.ndim))
    overlap = (pred & true).sum(axis=axes).astype(np.float64)
    size = pred.sum(axis=axes) + true.sum(axis=axes)
    return np.where(size > 0, 2 * overlap / np.maximum(size, 1), 1.0)


# ----------------------------------------------------------------------------------------------- scores


@dataclass
class Scores:
    """One model's test outputs, kept so that it can be scored and paired with another model's later.

    ``targets``/``values``: ``classes``: (n,) class indices and (n, K) probabilities; ``labels``: (n, K) 0/1
    and (n, K) probabilities (``thresholds`` (K,)); ``masks``: no targets, (n, S) per-image Dice.
    """

    kind: str
    paths: list[str]
    groups: list[str]
    """Patient id per image ("" when unknown: the image is its own unit)."""
    names: list[str]
    values: np.ndarray
    targets: np.ndarray | None = None
    thresholds: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_outputs(
        cls,
        paths: Sequence[str],
        groups: Sequence[str | None],
        targets: np.ndarray,
        probs: np.ndarray,
        names: Sequence[str],
        thresholds: Sequence[float] | None = None,
    ) -> Scores:
        """What a task's outputs are, read from their shapes: (n,) targets are class indices, (n, K) 0/1
        targets are multi-label, anything with spatial axes is a mask per structure (n, S, H, W)."""
        targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
        common = dict(paths=[str(p) for p in paths], groups=[g or "" for g in groups], names=list(names))
        if targets.ndim == 1:
            return cls("classes", values=probs, targets=targets.astype(np.int64), **common)
        if targets.ndim == 2:
            notes = []
            if thresholds is None:
                thresholds = [0.5] * targets.shape[1]
                notes.append("the model stores no per-label thresholds: F1 at 0.5")
            cut = np.asarray(thresholds, dtype=np.float64)
            return cls(
                "labels", values=probs, targets=targets.astype(np.int8), thresholds=cut, notes=notes, **common
            )
        return cls("masks", values=dice_per_image(probs, targets), **common)

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The reported metrics of this kind, the headline one first."""
        if self.kind == "classes":
            return tuple(COMPARED)
        if self.kind == "labels":
            return tuple(LABEL_COMPARED)
        return ("dice", *(f"dice_{n}" for n in self.names))

    def replicates(self, rows: np.ndarray | None = None) -> Replicates:
        """The replicate function of these scores (restricted to ``rows`` when given)."""
        idx = np.arange(self.n) if rows is None else rows
        values = self.values[idx]
        if self.kind == "classes":
            return class_replicates(self.targets[idx], values)
        if self.kind == "labels":
            return label_replicates(self.targets[idx], values, self.thresholds)
        return mask_replicates(values, self.names)

    def headline(self, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
        """``{"n", "ci_unit", metric: value, metric_ci: [lo, hi]}`` for every metric of this kind."""
        rep = self.replicates()
        point = rep(np.ones((1, self.n)))
        has_groups = _has_groups(self.groups)
        out: dict[str, Any] = {"n": self.n}
        reps = rep(resample_weights(self.n, n_resamples, seed, self.groups if has_groups else None))
        for name in point:
            out[name] = _scalar(point[name])
            out[f"{name}_ci"] = [_finite(v) for v in _interval(reps[name], level)] if n_resamples else None
        out["ci_unit"] = "patient" if has_groups else "image"
        return out

    def compare(self, other: Scores, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """``self - other`` on the test images both scored (matched by path), resampling patients jointly."""
        if (self.kind, self.names) != (other.kind, other.names):
            raise CxrcaeError(
                f"cannot pair {self.kind} over {', '.join(self.names)} with {other.kind} over "
                f"{', '.join(other.names)}: the two were not scored on the same task"
            )
        index = {p: i for i, p in enumerate(other.paths)}
        common = [p for p in self.paths if p in index]
        if not common:
            raise CxrcaeError("the two models share no scored test image; cannot pair them")
        mine = np.asarray([i for i, p in enumerate(self.paths) if p in index])
        theirs = np.asarray([index[p] for p in common])
        if self.targets is not None and not np.array_equal(self.targets[mine], other.targets[theirs]):
            raise CxrcaeError("the two models were scored against different answers for the same images")
        return paired_replicates(
            self.replicates(mine),
            other.replicates(theirs),
            len(common),
            groups=[self.groups[i] for i in mine],
            n_resamples=max(n_resamples, 1),
            seed=seed,
        )

    # ------------------------------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """An ``.npz`` (no pickles) written atomically; ``Scores.load`` reads it back."""
        arrays: dict[str, np.ndarray] = {
            "kind": np.asarray(self.kind),
            "paths": np.asarray(self.paths, dtype=str),
            "groups": np.asarray(self.groups, dtype=str),
            "names": np.asarray(self.names, dtype=str),
            "values": self.values,
            "notes": np.asarray(self.notes, dtype=str),
        }
        if self.targets is not None:
            arrays["targets"] = self.targets
        if self.thresholds is not None:
            arrays["thresholds"] = self.thresholds
        out = Path(path)
        with atomic_open(out, "wb") as f:
            np.savez(f, **arrays)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        with np.load(Path(path), allow_pickle=False) as z:
            kind = str(z["kind"])
            if kind not in KINDS:
                raise CxrcaeError(f"{path}: unknown scores kind {kind!r}")
            return cls(
                kind=kind,
                paths=[str(p) for p in z["paths"]],
                groups=[str(g) for g in z["groups"]],
                names=[str(n) for n in z["names"]],
                values=z["values"],
                targets=z["targets"] if "targets" in z else None,
                thresholds=z["thresholds"] if "thresholds" in z else None,
                notes=[str(n) for n in z["notes"]],
            )


def _has_groups(groups: Sequence[str | None] | None) -> bool:
    return groups is not None and any(g not in (None, "") for g in groups)


def _about(n: int, n_resamples: int, has_groups: bool, level: float, seed: int) -> dict[str, Any]:
    return {
        "n": int(n),
        "n_resamples": int(n_resamples),
        "unit": "patient" if has_groups else "image",
        "level": level,
        "seed": int(seed),
    }


def _scalar(arr: np.ndarray) -> float | None:
    value = float(np.asarray(arr).reshape(-1)[0])
    return None if np.isnan(value) else value


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
