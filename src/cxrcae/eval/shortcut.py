"""Shortcut check: can a linear probe on a model's encoder features tell where an image came from?

COVID X-ray models are known to learn the hospital instead of the disease: when each class comes mostly from
its own sources, any feature that recognises the source (scanner, text markers, patient age, processing)
also predicts the class. This check measures both halves of that on a dataset:

- how strongly class and source go together in the data: Cramer's V of the class x source table
  (``scipy.stats.contingency.association``; 0 = independent, 1 = the source gives the class away);
- how well the model's pooled encoder features predict the **source**, next to how well they predict the
  **label**: a logistic regression on standardized features, scored out of fold with patient-grouped,
  stratified folds (``StratifiedGroupKFold``: no patient in both the fitting and the scoring part), as
  balanced accuracy (chance = 1 / number of classes) and one-vs-rest macro ROC AUC;
- the source probe again **within each class**, where the label cannot help: if the features still tell
  the sources apart there, the source signal is in the features on its own.

A high source score (macro AUC >= ``SOURCE_WARN``) on confounded data (V >= ``CONFOUNDED``) is a warning: the
model can score well by recognising the source.
``ShortcutCheck`` plugs the check into ``cxrcae.data.audit.audit_records`` (``cxrcae audit --model``).
"""

from __future__ import annotations

import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats.contingency import association
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxrcae import bundled
from cxrcae.data.records import Record
from cxrcae.data.stream import iter_batches
from cxrcae.errors import CxrcaeError, DataError
from cxrcae.hub.resolve import load_encoder, resolve_checkpoint
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import resolve_device

BUNDLED = "bundled"
"""``model`` value naming the classifier shipped with cxrcae."""
DEFAULT_FOLDS = 5
SOURCE_WARN = 0.8
"""Source-probe macro ROC AUC from which, on confounded data, the check warns. AUC rather than balanced
accuracy because its chance level (0.5) does not move with the number of sources, and a probe that ranks the
right source first without always picking it still shows the source is in the features."""
CONFOUNDED = 0.3
"""Cramer's V from which class and source count as confounded (0.3 is a strong association by convention)."""
PROBE_TASK = "shortcut probe"
EMBED_TASK = "shortcut features"


@dataclass
class ProbeScore:
    """Out-of-fold scores of one linear probe."""

    target: str
    classes: list[str]
    images: int
    units: int
    folds: int
    balanced_accuracy: float
    macro_auc: float
    support: dict[str, int] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "classes": self.classes,
            "support": self.support,
            "images": self.images,
            "patients_or_images": self.units,
            "folds": self.folds,
            "balanced_accuracy": _round(self.balanced_accuracy),
            "chance": _round(self.chance),
            "macro_auc": _round(self.macro_auc),
        }


@dataclass
class ShortcutReport:
    """What the shortcut check found; an ``AuditSection`` of ``cxrcae.data.audit``."""

    model: str
    images: int
    features: int
    source: ProbeScore | None
    label: ProbeScore | None
    within_class: dict[str, ProbeScore]
    cramers_v: float | None
    notes: list[str] = field(default_factory=list)
    key: str = "shortcut"
    title: str = "Shortcut check: what the model's features predict"

    @property
    def within_class_auc(self) -> float | None:
        """Image-weighted mean macro AUC of the within-class source probes (None when there are none)."""
        scores = [s for s in self.within_class.values() if np.isfinite(s.macro_auc)]
        if not scores:
            return None
        return float(sum(s.macro_auc * s.images for s in scores) / sum(s.images for s in scores))

    @property
    def warnings(self) -> list[str]:
        if self.source is None or self.cramers_v is None:
            return []
        if not self.source.macro_auc >= SOURCE_WARN or self.cramers_v < CONFOUNDED:
            return []
        within = self.within_class_auc
        inside = (
            f" Even among images of one class, where the label cannot help, it tells the sources apart "
            f"(macro AUC {within:.2f})."
            if within is not None
            else ""
        )
        return [
            f"The model's features tell the image source apart (macro AUC {self.source.macro_auc:.2f}, "
            f"balanced accuracy {self.source.balanced_accuracy:.2f} against {self.source.chance:.2f} by "
            "chance), and in this data the "
            f"class depends on the source (Cramer's V {self.cramers_v:.2f}).{inside} A classifier can then "
            "score well by recognising the hospital, scanner or patient group behind each source instead of "
            "the disease, and fail on X-rays from anywhere else. Check the per-source results "
            "(cxrcae evaluate MODEL DATA --by source) and test on an external set before trusting it."
        ]

    def table(self) -> tuple[list[str], list[list[Any]]]:
        columns = ["probe predicts", "classes", "images", "balanced accuracy", "chance", "macro AUC"]
        rows = []
        for name, score in self._scores():
            rows.append(
                [
                    name,
                    len(score.classes),
                    score.images,
                    f"{score.balanced_accuracy:.3f}",
                    f"{score.chance:.3f}",
                    _fmt(score.macro_auc),
                ]
            )
        return columns, rows

    def _scores(self) -> list[tuple[str, ProbeScore]]:
        out = [(name, s) for name, s in (("source", self.source), ("label", self.label)) if s is not None]
        out += [(f"source, within {label}", s) for label, s in self.within_class.items()]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "images": self.images,
            "features": self.features,
            "cramers_v": _round(self.cramers_v),
            "source_probe": self.source.as_dict() if self.source else None,
            "label_probe": self.label.as_dict() if self.label else None,
            "source_probe_within_class": {k: v.as_dict() for k, v in self.within_class.items()},
            "within_class_source_auc": _round(self.within_class_auc),
            "source_auc_warn": SOURCE_WARN,
            "confounded_from": CONFOUNDED,
            "warnings": self.warnings,
            "notes": self.notes,
        }

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        lines.append(
            f"Linear probe (logistic regression on standardized pooled encoder features of `{self.model}`, "
            f"{self.images} images, {self.features} features), scored out of fold with patient-grouped "
            "stratified folds."
        )
        v = "n/a (one source or one class)" if self.cramers_v is None else f"{self.cramers_v:.3f}"
        lines += ["", f"Class x source association (Cramer's V): {v}", ""]
        columns, rows = self.table()
        lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        for warning in self.warnings:
            lines += ["", f"> Warning: {warning}"]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"


def _round(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------------------


def cramers_v(labels: Sequence[str], sources: Sequence[str]) -> float | None:
    """Cramer's V of the label x source contingency table; None when either has a single value."""
    rows, cols = sorted(set(labels)), sorted(set(sources))
    if len(rows) < 2 or len(cols) < 2:
        return None
    counts = Counter(zip(labels, sources, strict=True))
    table = np.array([[counts[(r, c)] for c in cols] for r in rows])
    return float(association(table, method="cramer"))


def probe(
    features: np.ndarray,
    targets: Sequence[str],
    units: Sequence[str],
    *,
    target: str,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    notes: list[str] | None = None,
    progress: ProgressFn = no_progress,
) -> ProbeScore | None:
    """Out-of-fold balanced accuracy and macro AUC of a logistic-regression probe for ``targets``.

    ``units`` are the grouping keys (patient, or the image itself): a unit is never split between the fitting
    and the scoring folds. Classes with fewer than ``folds`` units cannot be cross-validated and are left
    out (noted); None when fewer than two classes remain.
    """
    notes = notes if notes is not None else []
    units_of: dict[str, set[str]] = defaultdict(set)
    for t, u in zip(targets, units, strict=True):
        units_of[t].add(u)
    small = sorted(t for t, us in units_of.items() if len(us) < folds)
    if small:
        notes.append(
            f"{target} probe: left out {', '.join(f'{t} ({len(units_of[t])})' for t in small)}: fewer than "
            f"{folds} patients/images to cross-validate"
        )
    keep = np.array([t not in small for t in targets])
    classes = sorted(set(units_of) - set(small))
    if len(classes) < 2:
        return None
    x = features[keep]
    y = np.array([classes.index(t) for t, k in zip(targets, keep, strict=True) if k])
    groups = np.array(units)[keep]
    probs = np.zeros((len(y), len(classes)))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    unconverged = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (fit, score) in enumerate(splitter.split(x, y, groups)):
            model = make_pipeline(
                StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced")
            ).fit(x[fit], y[fit])
            probs[np.ix_(score, model.classes_)] = model.predict_proba(x[score])
            progress(PROBE_TASK, k + 1, folds, target)
        unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    if unconverged:
        notes.append(f"{target} probe: {unconverged} of {folds} fits stopped before converging")
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in range(len(classes)) if 0 < (y == c).sum() < len(y)]
    return ProbeScore(
        target=target,
        classes=classes,
        images=int(len(y)),
        units=len(set(groups.tolist())),
        folds=folds,
        balanced_accuracy=float(balanced_accuracy_score(y, probs.argmax(axis=1))),
        macro_auc=float(np.mean(aucs)) if aucs else float("nan"),
        support={c: int((y == i).sum()) for i, c in enumerate(classes)},
    )


def encoder_features(
    paths: Sequence[Path],
    model: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    progress: ProgressFn = no_progress,
) -> tuple[np.ndarray, list[int], list[tuple[int, str, str]]]:
    """Pooled encoder features (n_ok, C) of ``model`` (any cxrcae checkpoint), their indices, read errors."""
    dev = resolve_device(device)
    encoder = load_encoder(model, pooled=True, device=dev)
    chunks, ok, errors = [], [], []
    done = 0
    for batch in iter_batches(paths, encoder.image_size, encoder.resize_mode, batch_size, num_workers):
        errors += batch.errors
        if batch.indices:
            with torch.inference_mode():
                chunks.append(encoder(batch.images.to(dev)).float().cpu().numpy())
            ok += batch.indices
        done += len(batch)
        progress(EMBED_TASK, done, len(paths))
    width = encoder.num_features
    return (np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)), ok, errors


def resolve_model(model: str | Path) -> str | Path:
    """``model`` itself, or the bundled classifier for ``"bundled"`` (unless a folder of that name exists)."""
    if str(model) == BUNDLED and not Path(model).exists():
        return bundled.require(bundled.bundled_classifier(), "model", "pass --model MODEL_DIR or a Hub id")
    return model


def _unit(record: Record) -> str:
    """Patient ids are only unique within a source; an image without one is its own unit."""
    if record.patient_id:
        return f"patient\0{record.source}\0{record.patient_id}"
    return f"image\0{record.path}"


def sample_records(records: Sequence[Record], max_images: int, seed: int = 0) -> list[Record]:
    """About ``max_images`` records, whole patients at a time in one seeded order (input order kept)."""
    by_unit: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_unit[_unit(r)].append(i)
    order = sorted(by_unit)
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    for unit in order:
        if len(chosen) >= max_images:
            break
        chosen += by_unit[unit]
    return [records[i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------------


def shortcut_check(
    records: Sequence[Record],
    model: str | Path,
    *,
    max_images: int | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    progress: ProgressFn = no_progress,
) -> ShortcutReport:
    """Probe ``model``'s encoder features on the labelled images with a known source of ``records``.

    ``max_images`` probes a seeded sample of whole patients instead of every image (the features are the
    slow part: one forward pass per image). Unreadable images are left out and counted in the notes.
    """
    if folds < 2:
        raise CxrcaeError(f"the shortcut probe needs at least 2 folds, got {folds}")
    ref = resolve_model(model)
    notes: list[str] = []
    usable = [r for r in records if r.label is not None and r.source]
    if len(usable) < len(records):
        notes.append(f"{len(records) - len(usable)} image(s) without a label or a source left out")
    if not usable:
        raise DataError("the shortcut check needs labelled images with a source column")
    if max_images is not None and len(usable) > max_images:
        usable = sample_records(usable, max_images, seed)
        notes.append(f"probed a seeded sample of {len(usable)} images (whole patients), not all of them")
    features, ok, errors = encoder_features(
        [Path(r.path) for r in usable],
        ref,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
    if errors:
        notes.append(f"{len(errors)} unreadable image(s) left out of the probe")
    kept = [usable[i] for i in ok]
    labels = [str(r.label) for r in kept]
    sources = [str(r.source) for r in kept]
    units = [_unit(r) for r in kept]
    common = {"folds": folds, "seed": seed, "notes": notes, "progress": progress}
    source = probe(features, sources, units, target="source", **common)
    if source is None:
        notes.append("fewer than two sources with enough images: the source probe was not run")
    within: dict[str, ProbeScore] = {}
    if source is not None:
        for label in sorted(set(labels)):
            idx = [i for i, lab in enumerate(labels) if lab == label]
            score = probe(
                features[idx],
                [sources[i] for i in idx],
                [units[i] for i in idx],
                target=f"source within {label}",
                **common,
            )
            if score is not None:
                within[label] = score
    return ShortcutReport(
        model=str(ref),
        images=len(kept),
        features=int(features.shape[1]),
        source=source,
        label=probe(features, labels, units, target="label", **common),
        within_class=within,
        cramers_v=cramers_v(labels, sources),
        notes=notes,
    )


@dataclass(frozen=True)
class ShortcutCheck:
    """``shortcut_check`` with its settings bound: an ``AuditCheck`` for ``audit_records(checks=...)``."""

    model: str | Path
    max_images: int | None = None
    folds: int = DEFAULT_FOLDS
    seed: int = 0
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        # resolved (a Hub id downloaded) now, so a bad --model fails before the audit hashes any image
        object.__setattr__(self, "model", resolve_checkpoint(resolve_model(self.model)))

    def __call__(self, records: Sequence[Record], progress: ProgressFn = no_progress) -> ShortcutReport:
        return shortcut_check(
            records,
            self.model,
            max_images=self.max_images,
            folds=self.folds,
            seed=self.seed,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            progress=progress,
        )
