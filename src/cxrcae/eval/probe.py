"""Linear probe: how much a frozen encoder's features say about labels, in minutes on a CPU.

``linear_probe(encoder, data)`` reads a labelled dataset (class folders or a manifest with ``label``; or
multi-label columns, ``cxrcae.data.labels``), takes a manifest's ``split`` column as it is or makes a
patient-grouped stratified split (``cxrcae.data.splits``), encodes every image once with the frozen encoder
(``cxrcae.hub.encoders``: its final feature map, global average pooled), and fits scikit-learn's
logistic regression on the standardised train features. The regularisation ``C`` is the one of ``C_GRID``
with the lowest validation log loss (one ``C`` for all labels of a multi-label set); multi-label
thresholds are chosen per label on validation (best F1). Test metrics come from ``cxrcae.metrics`` with
patient-bootstrap intervals. ``fraction`` keeps a nested, seeded share of the labelled train patients
(``label_fraction``) for label-efficiency curves.

The steps are public so that a benchmark can encode once and fit many times:
``probe_data`` -> ``encode_records`` -> ``fit_probe`` (per fraction) -> ``write_probe``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from cxrcae._atomic import atomic_write_text
from cxrcae.data.labels import LabelSource, check_train_labels, read_multilabels
from cxrcae.data.records import SPLITS, Record, class_names, load_records
from cxrcae.data.splits import DEFAULT_RATIOS, fraction_mask, split_by
from cxrcae.errors import CxrcaeError, DataError
from cxrcae.eval.shortcut import sample_records
from cxrcae.hub.encoders import ResolvedEncoder, resolve_encoder
from cxrcae.infer.batches import iter_batches
from cxrcae.metrics import MULTILABEL_METRICS, choose_thresholds, full_report, multilabel_report
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import resolve_device

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Inverse regularisation strengths tried; the one with the lowest validation log loss wins."""
CLASSIFY, MULTILABEL = "classify", "multilabel"
MAX_ITER = 2000
_EPS = 1e-7


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of one probe; ``image_size`` None means the encoder's own input size."""

    image_size: int | None = None
    batch_size: int = 32
    fraction: float = 1.0
    seed: int = 0
    limit: int | None = None
    labels: LabelSource | None = None
    device: str = "auto"
    num_workers: int = 0
    n_bootstrap: int = 1000
    c_grid: tuple[float, ...] = C_GRID
    dedupe: bool = True
    """When a split is made: keep identical-pixel images together (decodes every image once more)."""

    def validate(self) -> None:
        if self.image_size is not None and (self.image_size < 32 or self.image_size % 32):
            raise CxrcaeError(f"--image-size must be a multiple of 32, at least 32; got {self.image_size}")
        if not 0 < self.fraction <= 1:
            raise CxrcaeError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.batch_size < 1:
            raise CxrcaeError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 3:
            raise CxrcaeError(f"--limit must be at least 3 (train, val and test), got {self.limit}")
        if self.n_bootstrap < 0:
            raise CxrcaeError(f"--bootstrap must be 0 or more, got {self.n_bootstrap}")
        if not self.c_grid or any(not c > 0 for c in self.c_grid):
            raise CxrcaeError("the C grid needs positive values")


# ----------------------------------------------------------------------------------------------- data


@dataclass
class ProbeData:
    """Labelled records with their split, and targets: (n,) class indices or (n, k) 0/1 labels."""

    source: str
    task: str
    records: list[Record]
    targets: np.ndarray
    names: tuple[str, ...]
    split_origin: str
    """``file`` (the manifest's split column) or ``made`` (a patient-grouped split made here)."""
    strata: list[str]
    """What the split and ``fraction`` balance: the class, or the label combination."""
    notes: list[str] = field(default_factory=list)
    labels: dict[str, Any] | None = None
    """Where multi-label targets were read (``LabelSource.describe``)."""

    def split_of(self) -> np.ndarray:
        return np.asarray([r.split for r in self.records])


def probe_data(
    data: str | Path,
    labels: LabelSource | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    dedupe: bool = True,
    progress: ProgressFn = no_progress,
) -> ProbeData:
    """Records, split and targets of ``data`` (module docstring); ``labels`` makes it multi-label."""
    notes: list[str] = []
    records = load_records(data, labeled=labels is None)
    if labels is None:
        labelled = [r for r in records if r.label is not None]
        if len(labelled) < len(records):
            notes.append(f"{len(records) - len(labelled)} unlabelled image(s) left out")
        if not labelled:
            raise DataError(f"{data}: no labelled images")
    else:
        ml = read_multilabels(records, labels, data)  # columns checked, empty cells left out
        if ml.unlabelled:
            notes.append(f"{ml.unlabelled} image(s) with an empty label cell left out")
        labelled = ml.records
    records = labelled
    if limit is not None and limit < len(records):
        records = sample_records(records, limit, seed)
        notes.append(f"--limit: {len(records)} of {len(labelled)} images (whole patients, seeded)")
    origin = "file" if any(r.split is not None for r in records) else "made"
    if origin == "file" and any(r.split is None for r in records):
        notes.append(f"{sum(r.split is None for r in records)} image(s) without a split value left out")
        records = [r for r in records if r.split is not None]
    if labels is not None:  # read again: names are the labels these images have
        ml = read_multilabels(records, labels, data)
        strata = ml.strata()
    else:
        strata = [r.label or "" for r in records]
    if origin == "made":
        records = split_by(records, strata, seed, dedupe=dedupe, progress=progress)
        notes.append(
            "no split column: made a patient-grouped stratified "
            f"{'/'.join(f'{x:g}' for x in DEFAULT_RATIOS)} train/val/test split (seed {seed})"
        )
    split = np.asarray([r.split for r in records])
    empty = [s for s in SPLITS if not (split == s).any()]
    if empty:
        raise DataError(
            f"{data}: no {' or '.join(empty)} images; the probe fits on train, chooses C on val and "
            "scores on test (add images or fix the split column)"
        )

    if labels is None:
        names = tuple(class_names(r for r in records if r.split == "train"))
        if len(names) < 2:
            raise DataError(f"{data}: need at least two classes in the train split, found {list(names)}")
        unknown = sorted({r.label for r in records if r.split != "train" and r.label not in names})
        if unknown:
            raise DataError(
                f"{data}: label(s) {', '.join(unknown)} are in val/test but never in train; drop or re-split"
            )
        index = {n: i for i, n in enumerate(names)}
        targets = np.asarray([index[r.label] for r in records], dtype=np.int64)
        task = CLASSIFY
    else:
        check_train_labels(ml.targets, ml.names, split, data)
        targets, names, task = ml.targets, ml.names, MULTILABEL
    return ProbeData(
        str(data),
        task,
        records,
        targets,
        tuple(names),
        origin,
        strata,
        notes,
        labels=None if labels is None else labels.describe(),
    )


# ----------------------------------------------------------------------------------------------- features


@dataclass
class Features:
    """Pooled features of the readable files: ``values[i]`` belongs to record ``ok[i]``."""

    values: np.ndarray
    ok: np.ndarray
    errors: list[tuple[int, str, str]]
    encoder: dict[str, Any]
    image_size: int
    seconds: float


def encode_records(
    encoder: ResolvedEncoder,
    paths: Sequence[str | Path],
    *,
    image_size: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    progress: ProgressFn = no_progress,
) -> Features:
    """Frozen, globally pooled features of ``paths`` in batches; unreadable files become ``errors``."""
    start = time.perf_counter()
    dev = resolve_device(device)
    size = int(image_size or encoder.image_size)
    model = encoder.pooled().to(dev).eval()
    chunks, ok, errors = [], [], []
    done, task = 0, f"features ({encoder.spec})"
    progress(task, 0, len(paths))
    for batch in iter_batches(paths, size, encoder.resize_mode, batch_size, num_workers):
        errors += batch.errors
        if batch.indices:
            with torch.inference_mode():
                chunks.append(model(batch.images.to(dev)).float().cpu().numpy())
            ok += batch.indices
        done += len(batch)
        progress(task, done, len(paths))
    values = np.concatenate(chunks) if chunks else np.zeros((0, encoder.num_features), np.float32)
    if not np.isfinite(values).all():
        raise CxrcaeError(f"{encoder.spec}: the encoder produced NaN or infinite features")
    return Features(
        values=values,
        ok=np.asarray(ok, dtype=np.int64),
        errors=errors,
        encoder={**encoder.describe(), "probe_image_size": size},
        image_size=size,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------------- fitting


@dataclass
class ProbeResult:
    """Test metrics of a linear probe, what it was fitted on, and its test predictions."""

    encoder: dict[str, Any]
    source: str
    task: str
    names: tuple[str, ...]
    split_origin: str
    fraction: float
    seed: int
    counts: dict[str, int]
    c: float
    c_search: list[dict[str, float]]
    metrics: dict[str, Any]
    thresholds: list[float] | None = None
    labels: dict[str, Any] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    test_paths: list[str] = field(default_factory=list, repr=False)
    test_groups: list[str | None] = field(default_factory=list, repr=False)
    test_targets: np.ndarray | None = field(default=None, repr=False)
    test_probs: np.ndarray | None = field(default=None, repr=False)

    def headline(self) -> dict[str, Any]:
        """The figures a comparison table shows, each as {"value", "ci"}: macro AUC first."""
        m, ci = self.metrics, self.metrics.get("ci") or {}
        if self.task == CLASSIFY:
            pairs = {
                "macro_auc": (m["macro"]["auc"], ci.get("macro", {}).get("auc")),
                "accuracy": (m["accuracy"], ci.get("accuracy")),
                "balanced_accuracy": (m["macro"]["recall"], ci.get("macro", {}).get("recall")),
                "macro_f1": (m["macro"]["f1"], ci.get("macro", {}).get("f1")),
            }
        else:
            pairs = {
                f"{avg}_{metric}": (m[avg][metric], ci.get(avg, {}).get(metric))
                for avg in ("macro", "micro")
                for metric in ("auc", "ap", "f1")
            }
        return {
            k: {"value": _num(v), "ci": [_num(x) for x in c] if c else None} for k, (v, c) in pairs.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "probe",
            "task": self.task,
            "encoder": self.encoder,
            "data": self.source,
            "names": list(self.names),
            "labels": self.labels,
            "split_origin": self.split_origin,
            "fraction": self.fraction,
            "seed": self.seed,
            "counts": self.counts,
            "C": self.c,
            "c_search": self.c_search,
            "thresholds": self.thresholds,
            "headline": self.headline(),
            "test": _json_ready(self.metrics),
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped],
            "notes": self.notes,
            "seconds": self.seconds,
            "files": self.files,
        }


def fit_probe(
    pdata: ProbeData,
    features: Features,
    *,
    fraction: float = 1.0,
    seed: int = 0,
    c_grid: Sequence[float] = C_GRID,
    n_bootstrap: int = 1000,
) -> ProbeResult:
    """Logistic regression on the train features (``fraction`` of the train patients, nested and seeded),
    C chosen on val, scored on test with patient-bootstrap intervals."""
    start = time.perf_counter()
    notes = list(pdata.notes)
    split = pdata.split_of()
    usable = np.zeros(len(pdata.records), dtype=bool)
    usable[features.ok] = True
    row_of = np.full(len(pdata.records), -1, dtype=np.int64)
    row_of[features.ok] = np.arange(features.ok.size)
    kept = _fraction_mask(pdata, fraction, seed)
    train = np.flatnonzero((split == "train") & kept & usable)
    val, test = np.flatnonzero((split == "val") & usable), np.flatnonzero((split == "test") & usable)
    for name, idx in (("train", train), ("val", val), ("test", test)):
        if idx.size == 0:
            raise DataError(f"{pdata.source}: no readable {name} images left to probe with")
    if fraction < 1:
        available = int(((split == "train") & usable).sum())
        notes.append(f"--fraction {fraction:g}: {train.size} of {available} train images")

    scaler = StandardScaler().fit(features.values[row_of[train]])

    def x(idx: np.ndarray) -> np.ndarray:
        return scaler.transform(features.values[row_of[idx]])

    y = pdata.targets
    fit = _fit_classify if pdata.task == CLASSIFY else _fit_multilabel
    search, best = [], None
    for c in sorted(float(v) for v in c_grid):
        model = fit(x(train), y[train], c, len(pdata.names))
        val_probs = model.predict(x(val))
        loss = _val_loss(pdata.task, y[val], val_probs)
        search.append({"C": c, "val_log_loss": loss})
        if best is None or loss < best[1] - 1e-12:  # ties: the smaller C (stronger regularisation)
            best = (c, loss, model, val_probs)
    assert best is not None
    c, _, model, val_probs = best
    probs = model.predict(x(test))
    groups = [pdata.records[i].patient_id for i in test]
    thresholds = None
    if pdata.task == CLASSIFY:
        metrics = full_report(y[test], probs, pdata.names, groups=groups, n_resamples=n_bootstrap, seed=seed)
    else:
        thresholds = choose_thresholds(y[val], val_probs)
        metrics = multilabel_report(
            y[test], probs, pdata.names, thresholds, groups=groups, n_resamples=n_bootstrap, seed=seed
        )
        thresholds = [float(t) for t in thresholds]
        no_val = [n for k, n in enumerate(pdata.names) if not y[val][:, k].any()]
        if no_val:
            notes.append(f"no positive val image for {', '.join(no_val)}: its threshold is 0.5")
    skipped = [(path, reason) for _, path, reason in features.errors]
    if skipped:
        notes.append(f"{len(skipped)} unreadable file(s) skipped")
    return ProbeResult(
        encoder=features.encoder,
        source=pdata.source,
        task=pdata.task,
        names=pdata.names,
        split_origin=pdata.split_origin,
        fraction=float(fraction),
        seed=int(seed),
        counts={
            "train": int(train.size),
            "train_available": int(((split == "train") & usable).sum()),
            "val": int(val.size),
            "test": int(test.size),
            "skipped_files": len(skipped),
        },
        c=c,
        c_search=search,
        metrics=metrics,
        thresholds=thresholds,
        labels=pdata.labels,
        skipped=skipped,
        notes=notes,
        seconds={"features": round(features.seconds, 3), "fit": round(time.perf_counter() - start, 3)},
        test_paths=[str(pdata.records[i].path) for i in test],
        test_groups=groups,
        test_targets=y[test],
        test_probs=probs,
    )


def _fraction_mask(pdata: ProbeData, fraction: float, seed: int) -> np.ndarray:
    """Which records stay: every val/test one, ``fraction`` of the train patients (``label_fraction``)."""
    if fraction >= 1:
        return np.ones(len(pdata.records), dtype=bool)
    return np.asarray(fraction_mask(pdata.records, pdata.strata, fraction, seed), dtype=bool)


class _Constant:
    """A label with one value in train: predict its train rate (a fitted model needs both classes)."""

    def __init__(self, rate: float):
        self.rate = rate

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.tile([1 - self.rate, self.rate], (x.shape[0], 1))


class _Fitted:
    def __init__(self, models: list[Any], multilabel: bool):
        self.models, self.multilabel = models, multilabel

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.multilabel:
            return np.stack([m.predict_proba(x)[:, 1] for m in self.models], axis=1)
        return self.models[0].predict_proba(x)


def _logistic(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    with warnings.catch_warnings():  # an unconverged fit at a tiny C is still a fair point on the curve
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=MAX_ITER).fit(x, y)


def _fit_classify(x: np.ndarray, y: np.ndarray, c: float, k: int) -> _Fitted:
    return _Fitted([_logistic(x, y, c)], multilabel=False)


def _fit_multilabel(x: np.ndarray, y: np.ndarray, c: float, k: int) -> _Fitted:
    models: list[Any] = []
    for j in range(k):
        col = y[:, j]
        models.append(_logistic(x, col, c) if 0 < col.sum() < col.size else _Constant(float(col.mean())))
    return _Fitted(models, multilabel=True)


def _val_loss(task: str, y: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, _EPS, 1 - _EPS)
    if task == CLASSIFY:
        return float(log_loss(y, p, labels=list(range(p.shape[1]))))
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


# ----------------------------------------------------------------------------------------------- all of it


def linear_probe(
    encoder: str | Path | ResolvedEncoder,
    data: str | Path,
    cfg: ProbeConfig | None = None,
    out: str | Path | None = None,
    progress: ProgressFn = no_progress,
) -> ProbeResult:
    """Probe ``encoder`` (a spec, ``cxrcae.hub.encoders``) on ``data``; with ``out``, write metrics.json,
    metrics.csv and predictions.csv there."""
    cfg = cfg or ProbeConfig()
    cfg.validate()
    start = time.perf_counter()
    resolved = encoder if isinstance(encoder, ResolvedEncoder) else resolve_encoder(encoder, seed=cfg.seed)
    pdata = probe_data(data, cfg.labels, seed=cfg.seed, limit=cfg.limit, dedupe=cfg.dedupe, progress=progress)
    features = encode_records(
        resolved,
        [r.path for r in pdata.records],
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=cfg.device,
        progress=progress,
    )
    result = fit_probe(
        pdata, features, fraction=cfg.fraction, seed=cfg.seed, c_grid=cfg.c_grid, n_bootstrap=cfg.n_bootstrap
    )
    result.seconds["total"] = round(time.perf_counter() - start, 3)
    if out is not None:
        write_probe(result, out)
    return result


# ----------------------------------------------------------------------------------------------- files


def write_probe(result: ProbeResult, out: str | Path) -> dict[str, str]:
    """metrics.json (everything), metrics.csv (one row per label/average and metric) and predictions.csv
    (each test image's targets and probabilities) in ``out``, each written atomically."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CxrcaeError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: str(folder / name) for name in ("metrics.json", "metrics.csv", "predictions.csv")}
    result.files = files
    atomic_write_text(
        folder / "metrics.csv",
        _csv_text(["label", "metric", "value", "ci_low", "ci_high"], metric_rows(result)),
    )
    atomic_write_text(folder / "predictions.csv", _predictions_csv(result))
    atomic_write_text(folder / "metrics.json", json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return files


def metric_rows(result: ProbeResult) -> list[list[Any]]:
    """[label, metric, value, ci_low, ci_high] for every figure: per class/label, then the averages."""
    m, ci = result.metrics, result.metrics.get("ci") or {}
    rows: list[list[Any]] = []

    def add(label: str, metric: str, value: Any, interval: Sequence[float] | None) -> None:
        lo, hi = interval if interval else (None, None)
        rows.append([label, metric, _num(value), _num(lo), _num(hi)])

    if result.task == CLASSIFY:
        add("all", "accuracy", m["accuracy"], ci.get("accuracy"))
        for name in result.names:
            for metric in ("precision", "recall", "specificity", "f1", "auc"):
                add(
                    name,
                    metric,
                    m["per_class"][name][metric],
                    ci.get("per_class", {}).get(name, {}).get(metric),
                )
        for avg in ("macro", "weighted"):
            for metric in ("precision", "recall", "specificity", "f1", "auc"):
                add(avg, metric, m[avg][metric], ci.get(avg, {}).get(metric))
    else:
        for name in result.names:
            for metric in MULTILABEL_METRICS:
                add(
                    name,
                    metric,
                    m["per_label"][name][metric],
                    ci.get("per_label", {}).get(name, {}).get(metric),
                )
            add(name, "threshold", m["per_label"][name]["threshold"], None)
        for avg in ("macro", "micro"):
            for metric in MULTILABEL_METRICS:
                add(avg, metric, m[avg][metric], ci.get(avg, {}).get(metric))
    return rows


def _predictions_csv(result: ProbeResult) -> str:
    names = list(result.names)
    if result.task == CLASSIFY:
        header = ["path", "patient_id", "label", *[f"prob_{n}" for n in names]]
        rows = [
            [p, g or "", names[int(t)], *(f"{v:.6f}" for v in pr)]
            for p, g, t, pr in zip(
                result.test_paths, result.test_groups, result.test_targets, result.test_probs, strict=True
            )
        ]
    else:
        header = ["path", "patient_id", *names, *[f"prob_{n}" for n in names]]
        rows = [
            [p, g or "", *(int(v) for v in t), *(f"{v:.6f}" for v in pr)]
            for p, g, t, pr in zip(
                result.test_paths, result.test_groups, result.test_targets, result.test_probs, strict=True
            )
        ]
    return _csv_text(header, rows)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def _num(value: Any) -> float | None:
    """A JSON-safe number: NaN (an undefined metric) becomes None."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return _num(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    return value
