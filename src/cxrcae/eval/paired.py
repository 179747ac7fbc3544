"""Paired bootstrap comparison of two classifiers scored on the same test images.

Two separate confidence intervals that overlap say little about which model is better; the question is the
interval of the **difference**. Each resample draws patients (or images, when patient ids are unknown) once
and scores both models on that same draw, so the variation the two share (which patients happen to be
easy) cancels out. That is what makes the paired interval much narrower than two unpaired ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cxrcae.metrics import _interval, _replicate_metrics, resample_weights

COMPARED = {"accuracy": "accuracy", "macro_f1": "macro:f1", "macro_auc": "macro:auc"}
"""Reported name -> key of the bootstrap replicate metrics."""


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
    has_groups = groups is not None and any(g not in (None, "") for g in groups)
    full = np.ones((1, y.size))
    point_a, point_b = _replicate_metrics(full, y, a), _replicate_metrics(full, y, b)
    weights = resample_weights(y.size, n_resamples, seed, groups if has_groups else None)
    reps_a, reps_b = _replicate_metrics(weights, y, a), _replicate_metrics(weights, y, b)
    out: dict[str, Any] = {}
    for name, key in COMPARED.items():
        diff = reps_a[key] - reps_b[key]
        valid = diff[~np.isnan(diff)]
        out[name] = {
            "a": _scalar(point_a[key]),
            "b": _scalar(point_b[key]),
            "difference": _scalar(point_a[key] - point_b[key]),
            "ci": list(_interval(diff, level)),
            "p_a_not_better": float((valid <= 0).mean()) if valid.size else None,
        }
    out["n"] = int(y.size)
    out["n_resamples"] = int(n_resamples)
    out["unit"] = "patient" if has_groups else "image"
    out["level"] = level
    out["seed"] = int(seed)
    return out


def _scalar(arr: np.ndarray) -> float | None:
    value = float(np.asarray(arr).reshape(-1)[0])
    return None if np.isnan(value) else value
