"""Classification metrics with 95% bootstrap intervals, and calibration error.

Point estimates come from scikit-learn (precision/recall/F1, confusion matrix, one-vs-rest ROC AUC), so the
numbers are the ones reviewers can recompute. The bootstrap is vectorised: a resample is a vector of
per-sample weights (how often each image, or each patient's images, was drawn), so every resample's
confusion matrix is one matrix product and every resample's AUC is a weighted Mann-Whitney sum over the
scores sorted once. 1000 resamples of a few thousand images take well under a second.

Resampling patients (not images) when patient ids are known keeps a patient's correlated images together,
which is what makes the interval honest; images without a patient id are their own unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

# Per-class metrics; the macro/weighted rows average them (accuracy is overall, not averaged).
CLASS_METRICS = ("precision", "recall", "specificity", "f1", "auc")
SUMMARY_METRICS = ("accuracy", *CLASS_METRICS)
DEFAULT_BINS = 15


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (n, n_classes) with n={y.shape[0]}, got {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError("labels must index the probability columns")
    return y, p


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` along the last axis."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# Point estimates (scikit-learn)
# ---------------------------------------------------------------------------------------------------------


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Per-class, macro and weighted metrics plus the confusion matrix, from scikit-learn.

    Returns ``{"accuracy", "n", "per_class": {name: {...,"support"}}, "macro": {...}, "weighted": {...},
    "confusion_matrix": [[...]]}``; recall is sensitivity. Undefined values (AUC of a class absent from
    ``y_true``) are NaN and are left out of the macro/weighted averages.
    """

    y, p = _check(np.asarray(y_true), probs)
    k = p.shape[1]
    labels = list(range(k))
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    spec = _specificity(cm[None].astype(np.float64))[0]
    auc = np.array([_auc_sklearn(y == c, p[:, c]) for c in labels])
    # A class absent from y_true has no recall/F1 (sklearn would report 0 and drag the macro mean down).
    rec, f1 = rec.astype(np.float64), f1.astype(np.float64)
    rec[support == 0] = np.nan
    f1[support == 0] = np.nan

    per_class = {
        name: {
            "precision": float(prec[c]),
            "recall": float(rec[c]),
            "specificity": float(spec[c]),
            "f1": float(f1[c]),
            "auc": float(auc[c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(class_names)
    }
    values = {"precision": prec, "recall": rec, "specificity": spec, "f1": f1, "auc": auc}
    macro = {m: _nanmean(v) for m, v in values.items()}
    weighted = {m: _nanaverage(v, support) for m, v in values.items()}
    acc = float(accuracy_score(y, pred)) if y.size else float("nan")
    return {
        "n": int(y.size),
        "accuracy": acc,
        "per_class": per_class,
        "macro": {"accuracy": acc, **macro},
        "weighted": {"accuracy": acc, **weighted},
        "confusion_matrix": cm.tolist(),
    }


def _auc_sklearn(positive: np.ndarray, scores: np.ndarray) -> float:

    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def _specificity(cm: np.ndarray) -> np.ndarray:
    """(B, K, K) confusion matrices -> (B, K) one-vs-rest specificity TN / (TN + FP)."""
    total = cm.sum(axis=(1, 2))[:, None]
    tp = np.diagonal(cm, axis1=1, axis2=2)
    fp = cm.sum(axis=1) - tp
    fn = cm.sum(axis=2) - tp
    tn = total - tp - fp - fn
    return _safe_div(tn, tn + fp)


def _safe_div(a: np.ndarray, b: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """Elementwise a / b with ``empty`` where b == 0 (sklearn's zero_division=0 convention)."""
    out = np.full(np.broadcast(a, b).shape, empty, dtype=np.float64)
    np.divide(a, b, out=out, where=b > 0)
    return out


def _nanmean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")


def _nanaverage(v: np.ndarray, weights: np.ndarray) -> float:
    v, w = np.asarray(v, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    ok = ~np.isnan(v) & (w > 0)
    return float((v[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------


def calibration_bins(y_true: Sequence[int], probs: np.ndarray, n_bins: int = DEFAULT_BINS) -> dict:
    """Top-label reliability table: per equal-width confidence bin, its count, mean confidence, accuracy."""
    y, p = _check(np.asarray(y_true), probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = _bin_index(conf, n_bins)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "confidence": _safe_div(conf_sum, count, np.nan).tolist(),
        "accuracy": _safe_div(acc_sum, count, np.nan).tolist(),
    }


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bins (lo, hi] like the ECE literature; confidence 0 goes to the first bin."""
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def expected_calibration_error(y_true: Sequence[int], probs: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """ECE: sum over bins of |accuracy - mean confidence| weighted by the bin's share of samples."""
    y, p = _check(np.asarray(y_true), probs)
    if not y.size:
        return float("nan")
    ece = _ece_weighted(np.ones((1, y.size)), y, p, n_bins)
    return float(ece[0])


def _ece_weighted(weights: np.ndarray, y: np.ndarray, p: np.ndarray, n_bins: int) -> np.ndarray:
    """(B, n) sample weights -> (B,) ECE, one matrix product per quantity."""
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    onehot = np.zeros((y.size, n_bins))
    onehot[np.arange(y.size), _bin_index(conf, n_bins)] = 1.0
    count = weights @ onehot
    gap = np.abs(weights @ (onehot * correct[:, None]) - weights @ (onehot * conf[:, None]))
    return _safe_div(gap.sum(axis=1), count.sum(axis=1), np.nan)


def negative_log_likelihood(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Mean negative log probability of the true class (probabilities clipped at 1e-12); NaN when empty."""
    y, p = _check(np.asarray(y_true), probs)
    return float(-np.log(np.clip(p[np.arange(y.size), y], 1e-12, 1.0)).mean()) if y.size else float("nan")


def brier_score(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Multi-class Brier score: mean squared distance between the probability vector and the one-hot label."""
    y, p = _check(np.asarray(y_true), probs)
    if not y.size:
        return float("nan")
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


# ---------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------


def resample_weights(
    n: int, n_resamples: int, seed: int, groups: Sequence[str | None] | None = None
) -> np.ndarray:
    """(B, n) counts of how often each sample is drawn in each resample.

    With ``groups`` (patient ids; None/"" = unknown), whole groups are drawn with replacement and every
    image of a drawn group gets the group's count; a sample without a group is a group of its own.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        unit = np.arange(n)
    else:
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} samples")
        unit = _units(groups)
    n_units = int(unit.max()) + 1 if n else 0
    if n_units == 0:
        return np.zeros((n_resamples, 0))
    counts = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_resamples)
    return counts[:, unit].astype(np.float64)


def _units(groups: Sequence[str | None]) -> np.ndarray:
    """Unit index per sample: one per distinct group, one per sample without a group."""
    ids: dict[Any, int] = {}
    unit = np.empty(len(groups), dtype=np.int64)
    for i, g in enumerate(groups):
        key = ("image", i) if g is None or g == "" else ("group", g)
        unit[i] = ids.setdefault(key, len(ids))
    return unit


def _weighted_auc(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B, n) weights -> (B,) one-vs-rest ROC AUC (ties count one half), NaN where a side is empty.

    Equals ``roc_auc_score(positive, scores, sample_weight=w)`` for each row ``w``.
    """
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w = weights[:, order]
    pos = positive[order]
    w_pos = np.add.reduceat(w * pos, starts, axis=1)
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    num = (w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1)
    den = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    return _safe_div(num, den, np.nan)


def _replicate_metrics(weights: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for every resample: per-class arrays (B, K) and summary arrays (B,)."""
    b, k = weights.shape[0], p.shape[1]
    pred = p.argmax(axis=1)
    pair = np.zeros((y.size, k * k))
    pair[np.arange(y.size), y * k + pred] = 1.0
    cm = (weights @ pair).reshape(b, k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    total = cm.sum(axis=(1, 2))
    prec = _safe_div(tp, predicted)
    rec = _safe_div(tp, support)
    f1 = _safe_div(2 * prec * rec, prec + rec)
    spec = _specificity(cm)
    auc = np.stack([_weighted_auc(weights, y == c, p[:, c]) for c in range(k)], axis=1)
    # A class absent from a resample has no recall/F1/AUC there: NaN, so it neither counts nor averages.
    absent = support == 0
    for arr in (rec, f1):
        arr[absent] = np.nan
    per_class = {"precision": prec, "recall": rec, "specificity": spec, "f1": f1, "auc": auc}
    out: dict[str, np.ndarray] = {"accuracy": _safe_div(tp.sum(axis=1), total, np.nan)}
    for name, arr in per_class.items():
        out[f"class:{name}"] = arr
        valid = ~np.isnan(arr)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"macro:{name}"] = np.where(valid.any(1), np.nansum(arr, 1) / valid.sum(1), np.nan)
            w = np.where(valid, support, 0.0)
            out[f"weighted:{name}"] = np.where(
                w.sum(1) > 0, np.nansum(np.where(valid, arr, 0) * w, 1) / w.sum(1), np.nan
            )
    return out


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_intervals(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    groups: Sequence[str | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = DEFAULT_BINS,
) -> dict:
    """Percentile bootstrap intervals for every metric of ``classification_metrics`` plus ECE.

    Returns ``{"per_class": {name: {metric: [lo, hi]}}, "macro": {...}, "weighted": {...}, "ece": [lo, hi],
    "n_resamples", "unit" ("patient" or "image"), "n_units", "level", "seed"}``.
    """
    y, p = _check(np.asarray(y_true), probs)
    has_groups = groups is not None and any(g not in (None, "") for g in groups)
    weights = resample_weights(y.size, n_resamples, seed, groups if has_groups else None)
    reps = _replicate_metrics(weights, y, p)
    ece = _ece_weighted(weights, y, p, n_bins)

    def ci(arr: np.ndarray) -> list[float]:
        return list(_interval(arr, level))

    per_class = {
        name: {m: ci(reps[f"class:{m}"][:, c]) for m in CLASS_METRICS} for c, name in enumerate(class_names)
    }
    summary = {
        kind: {"accuracy": ci(reps["accuracy"]), **{m: ci(reps[f"{kind}:{m}"]) for m in CLASS_METRICS}}
        for kind in ("macro", "weighted")
    }
    n_units = int(_units(groups).max() + 1) if has_groups and y.size else int(y.size)
    return {
        "per_class": per_class,
        **summary,
        "accuracy": summary["macro"]["accuracy"],
        "ece": ci(ece),
        "n_resamples": int(n_resamples),
        "unit": "patient" if has_groups else "image",
        "n_units": n_units,
        "level": level,
        "seed": int(seed),
    }


def full_report(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    groups: Sequence[str | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    n_bins: int = DEFAULT_BINS,
) -> dict:
    """Point metrics, calibration and (when ``n_resamples`` > 0) their bootstrap intervals, JSON-ready."""
    y, p = _check(np.asarray(y_true), probs)
    report = classification_metrics(y, p, class_names)
    report["class_names"] = list(class_names)
    report["calibration"] = {
        "ece": expected_calibration_error(y, p, n_bins),
        "nll": negative_log_likelihood(y, p),
        "brier": brier_score(y, p),
        "n_bins": n_bins,
        "bins": calibration_bins(y, p, n_bins),
    }
    if n_resamples > 0 and y.size:
        report["ci"] = bootstrap_intervals(
            y, p, class_names, groups=groups, n_resamples=n_resamples, seed=seed, n_bins=n_bins
        )
    return report


# ---------------------------------------------------------------------------------------------------------
# Multi-label: per-label AUC, average precision and F1 at a chosen threshold; macro and micro; bootstrap
# ---------------------------------------------------------------------------------------------------------

MULTILABEL_METRICS = ("auc", "ap", "f1", "precision", "recall")
_CELLS_PER_CHUNK = 20_000_000  # resample x (image, label) cells held at once by the micro bootstrap


def _check_multilabel(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"targets and probs must both be (n, n_labels), got {y.shape} and {p.shape}")
    return y, p


def choose_thresholds(y_true: np.ndarray, probs: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per label, the cut that maximises F1 on these (validation) scores: midway between the lowest score
    called positive and the next one below (0 when every image is called positive; ``default`` for a label
    without a positive image here). Predict positive where ``prob >= threshold``."""
    y, p = _check_multilabel(y_true, probs)
    out = np.full(y.shape[1], float(default))
    for k in range(y.shape[1]):
        n_pos = int(y[:, k].sum())
        if n_pos == 0:
            continue
        order = np.argsort(-p[:, k], kind="mergesort")
        s, pos = p[order, k], y[order, k]
        last = np.r_[s[1:] != s[:-1], True]  # the last image of each run of equal scores
        tp = np.cumsum(pos)[last]
        called = np.flatnonzero(last) + 1
        f1 = 2 * tp / (called + n_pos)
        g = int(np.argmax(f1))
        cuts = s[last]
        out[k] = (cuts[g] + cuts[g + 1]) / 2 if g + 1 < cuts.size else 0.0
    return out


def multilabel_metrics(
    y_true: np.ndarray, probs: np.ndarray, names: Sequence[str], thresholds: Sequence[float]
) -> dict:
    """Per-label ROC AUC, average precision, and precision / recall / F1 at ``thresholds``, from
    scikit-learn; ``macro`` averages the labels (undefined ones left out), ``micro`` pools every
    (image, label) pair. Returns ``{"n", "per_label": {name: {..., "threshold", "support"}}, "macro",
    "micro"}``; AUC and AP are NaN for a label without both a positive and a negative image."""
    y, p = _check_multilabel(y_true, probs)
    thr = np.asarray(thresholds, dtype=np.float64)
    pred = p >= thr[None, :]
    per_label = {}
    for k, name in enumerate(names):
        prec, rec, f1, _ = precision_recall_fscore_support(
            y[:, k], pred[:, k], average="binary", zero_division=0
        )
        support = int(y[:, k].sum())
        per_label[name] = {
            "auc": _auc_sklearn(y[:, k], p[:, k]),
            "ap": _ap_sklearn(y[:, k], p[:, k]),
            "precision": float(prec),
            "recall": float(rec) if support else float("nan"),
            "f1": float(f1) if support else float("nan"),
            "threshold": float(thr[k]),
            "support": support,
        }
    macro = {m: _nanmean(np.array([per_label[n][m] for n in names])) for m in MULTILABEL_METRICS}
    flat_y, flat_p = y.ravel(), p.ravel()
    tp, fp, fn = (y & pred).sum(), (~y & pred).sum(), (y & ~pred).sum()
    micro = {
        "auc": _auc_sklearn(flat_y, flat_p),
        "ap": _ap_sklearn(flat_y, flat_p),
        "precision": float(tp / (tp + fp)) if tp + fp else 0.0,
        "recall": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fn else float("nan"),
    }
    return {"n": int(y.shape[0]), "per_label": per_label, "macro": macro, "micro": micro}


def _ap_sklearn(positive: np.ndarray, scores: np.ndarray) -> float:
    if positive.all() or not positive.any():
        return float("nan")
    return float(average_precision_score(positive, scores))


def _weighted_ap(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B, n) weights -> (B,) average precision, sum over score cuts of precision x recall gained; NaN where
    a resample has no positive (or no negative). Equals ``average_precision_score(..., sample_weight=w)``."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w = weights[:, order]
    pos = positive[order]
    w_pos = np.add.reduceat(w * pos, starts, axis=1)
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    tps, fps = np.cumsum(w_pos, axis=1), np.cumsum(w_neg, axis=1)
    precision = _safe_div(tps, tps + fps)
    total_pos, total_neg = tps[:, -1], fps[:, -1]
    ap = _safe_div((precision * w_pos).sum(axis=1), total_pos, np.nan)
    ap[(total_pos == 0) | (total_neg == 0)] = np.nan
    return ap


def _multilabel_replicates(weights: np.ndarray, y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict:
    """Every multi-label metric for every resample of one chunk: per-label (B, K), macro and micro (B,)."""
    k = y.shape[1]
    tp = weights @ (y & pred).astype(np.float64)
    fp = weights @ (~y & pred).astype(np.float64)
    fn = weights @ (y & ~pred).astype(np.float64)
    has_pos = (tp + fn) > 0
    per = {
        "auc": np.stack([_weighted_auc(weights, y[:, j], p[:, j]) for j in range(k)], axis=1),
        "ap": np.stack([_weighted_ap(weights, y[:, j], p[:, j]) for j in range(k)], axis=1),
        "precision": _safe_div(tp, tp + fp),
        "recall": np.where(has_pos, _safe_div(tp, tp + fn), np.nan),
        "f1": np.where(has_pos, _safe_div(2 * tp, 2 * tp + fp + fn), np.nan),
    }
    out: dict[str, np.ndarray] = {}
    for name, arr in per.items():
        out[f"label:{name}"] = arr
        valid = ~np.isnan(arr)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"macro:{name}"] = np.where(valid.any(1), np.nansum(arr, 1) / valid.sum(1), np.nan)
    flat_w = np.repeat(weights, k, axis=1)
    ttp, tfp, tfn = tp.sum(1), fp.sum(1), fn.sum(1)
    out["micro:auc"] = _weighted_auc(flat_w, y.ravel(), p.ravel())
    out["micro:ap"] = _weighted_ap(flat_w, y.ravel(), p.ravel())
    out["micro:precision"] = _safe_div(ttp, ttp + tfp)
    out["micro:recall"] = _safe_div(ttp, ttp + tfn, np.nan)
    out["micro:f1"] = _safe_div(2 * ttp, 2 * ttp + tfp + tfn, np.nan)
    return out


def multilabel_report(
    y_true: np.ndarray,
    probs: np.ndarray,
    names: Sequence[str],
    thresholds: Sequence[float],
    *,
    groups: Sequence[str | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """``multilabel_metrics`` plus (when ``n_resamples`` > 0) percentile bootstrap intervals under
    ``"ci"``: ``{"per_label": {name: {metric: [lo, hi]}}, "macro", "micro", "n_resamples",
    "unit", "n_units", "level", "seed"}``; patients (``groups``) are resampled whole."""
    y, p = _check_multilabel(y_true, probs)
    report = multilabel_metrics(y, p, names, thresholds)
    report["label_names"] = list(names)
    if n_resamples <= 0 or not y.shape[0]:
        return report
    has_groups = groups is not None and any(g not in (None, "") for g in groups)
    weights = resample_weights(y.shape[0], n_resamples, seed, groups if has_groups else None)
    pred = p >= np.asarray(thresholds, dtype=np.float64)[None, :]
    chunk = max(1, _CELLS_PER_CHUNK // max(1, y.size))
    parts = [_multilabel_replicates(weights[i : i + chunk], y, p, pred) for i in range(0, n_resamples, chunk)]
    reps = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def ci(arr: np.ndarray) -> list[float]:
        return list(_interval(arr, level))

    report["ci"] = {
        "per_label": {
            name: {m: ci(reps[f"label:{m}"][:, j]) for m in MULTILABEL_METRICS}
            for j, name in enumerate(names)
        },
        "macro": {m: ci(reps[f"macro:{m}"]) for m in MULTILABEL_METRICS},
        "micro": {m: ci(reps[f"micro:{m}"]) for m in MULTILABEL_METRICS},
        "n_resamples": int(n_resamples),
        "unit": "patient" if has_groups else "image",
        "n_units": int(_units(groups).max() + 1) if has_groups else int(y.shape[0]),
        "level": level,
        "seed": int(seed),
    }
    return report


def fmt_ci(value: Any, ci: Sequence[float] | None = None, digits: int = 3) -> str:
    """``0.912 (0.887-0.934)``; "n/a" for undefined values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci and all(v is not None and not math.isnan(v) for v in ci):
        text += f" ({ci[0]:.{digits}f}-{ci[1]:.{digits}f})"
    return text
