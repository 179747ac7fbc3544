"""Leak-free, stratified, seeded train/val/test splits.

Two images must land in the same split when they show the same patient (``patient_id``) or are the same
picture (identical decoded pixels, ``cxrcae.io.pixel_hash``) — otherwise test accuracy measures
memorisation. Such images are merged into groups with union-find (``cxrcae.data.groups``); groups are
then shuffled with a private RNG, sorted by size (largest first) and each is assigned greedily to the split
with the largest remaining per-class deficit, which keeps every class close to the requested ratios even
with large patient groups. The pixel hashes come from ``cxrcae.io.hash_files`` and are kept on the result
(``SplitResult.pixel_hashes``) so that an audit of the same files can reuse them.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cxrcae.data.groups import UnionFind
from cxrcae.data.records import SPLITS, UNLABELED, Record
from cxrcae.errors import DataError
from cxrcae.io import FileHashes, hash_files
from cxrcae.progress import ProgressFn, no_progress

DEFAULT_RATIOS = (0.73, 0.135, 0.135)
"""The paper's 73 / 13.5 / 13.5 train / validation / test split."""


@dataclass(frozen=True)
class SplitResult:
    """The split records plus what the split had to merge or could not check."""

    records: list[Record]
    ratios: tuple[float, float, float]
    seed: int
    groups: int
    """Number of leak-free groups (patients and duplicate sets merged) that were assigned."""
    deduplicated: bool
    duplicate_groups: list[list[Path]] = field(default_factory=list)
    """Sets of two or more distinct files with identical pixels; each set sits in one split."""
    hash_errors: list[tuple[Path, str]] = field(default_factory=list)
    """Files whose pixels could not be read for dedupe: (path, reason). They are still split."""
    pixel_hashes: FileHashes[str] | None = field(default=None, repr=False, compare=False)
    """Every file's ``pixel_hash`` (or failure) when deduplicated: pass it to ``audit_records`` so the
    audit does not hash the same files again."""

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts: per split x class, patients per split, duplicates merged, unreadable files."""
        by_path = {r.path: r for r in self.records}
        conflicting = sum(
            1 for group in self.duplicate_groups if len({by_path[p].label for p in group if p in by_path}) > 1
        )
        return {
            **split_summary(self.records),
            "ratios": list(self.ratios),
            "seed": self.seed,
            "groups": self.groups,
            "dedupe": self.deduplicated,
            "duplicate_groups": len(self.duplicate_groups),
            "duplicate_files": sum(len(g) for g in self.duplicate_groups),
            "duplicate_groups_conflicting_labels": conflicting,
            "hash_errors": [{"path": str(p), "reason": reason} for p, reason in self.hash_errors],
        }


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative fractions (train > 0) summing to 1; raises ``DataError`` otherwise."""
    values = tuple(float(r) for r in ratios)
    if len(values) != 3:
        raise DataError(f"ratios need three values (train, val, test), got {len(values)}")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise DataError(f"ratios must be non-negative numbers, got {_fmt_ratios(values)}")
    if values[0] <= 0:
        raise DataError(f"the train ratio must be above 0, got {_fmt_ratios(values)}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise DataError(f"ratios must sum to 1, got {_fmt_ratios(values)} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def _fmt_ratios(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def make_splits(
    records: Sequence[Record],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    *,
    dedupe: bool = True,
    workers: int | None = None,
    progress: ProgressFn = no_progress,
) -> list[Record]:
    """Records in input order with ``split`` set (any existing split is replaced). See ``split_records``."""
    return split_records(records, ratios, seed, dedupe=dedupe, workers=workers, progress=progress).records


def split_records(
    records: Sequence[Record],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    *,
    dedupe: bool = True,
    workers: int | None = None,
    progress: ProgressFn = no_progress,
) -> SplitResult:
    """Stratified split grouped by patient and (with ``dedupe``) by identical pixels.

    The result depends only on the records (not their order), the ratios and the seed: never on the
    global RNG or on the order in which the hashing threads finish.
    """
    fractions = check_ratios(ratios)
    records = list(records)
    if not records:
        raise DataError("no records to split")

    groups = UnionFind(len(records))
    first_by_key: dict[tuple[str, str], int] = {}
    for i, r in enumerate(records):
        keys = [("path", str(r.path))]
        if r.patient_id:
            keys.append(("patient", r.patient_id))
        for key in keys:
            groups.union(first_by_key.setdefault(key, i), i)

    duplicate_groups: list[list[Path]] = []
    hash_errors: list[tuple[Path, str]] = []
    pixel_hashes: FileHashes[str] | None = None
    if dedupe:
        unique_paths = sorted({r.path for r in records}, key=str)
        pixel_hashes = hash_files(unique_paths, workers=workers, progress=progress)
        hash_errors = pixel_hashes.error_list()
        by_hash: dict[str, list[Path]] = defaultdict(list)
        for path, digest in pixel_hashes.hashes.items():  # sorted by path, like unique_paths
            by_hash[digest].append(path)
        index_of = {r.path: i for i, r in enumerate(records)}
        for paths in by_hash.values():
            if len(paths) > 1:
                duplicate_groups.append(paths)
                for p in paths[1:]:
                    groups.union(index_of[paths[0]], index_of[p])
        duplicate_groups.sort(key=lambda g: str(g[0]))

    members = groups.groups()
    assignment = _assign(records, members, fractions, seed)
    split_records_ = [replace(r, split=assignment[i]) for i, r in enumerate(records)]
    return SplitResult(
        records=split_records_,
        ratios=fractions,
        seed=seed,
        groups=len(members),
        deduplicated=dedupe,
        duplicate_groups=duplicate_groups,
        hash_errors=hash_errors,
        pixel_hashes=pixel_hashes,
    )


def _assign(
    records: list[Record], groups: list[list[int]], ratios: tuple[float, float, float], seed: int
) -> dict[int, str]:
    """Greedy stratified assignment of whole groups; deterministic in (groups, ratios, seed)."""
    stratum = [r.label if r.label is not None else UNLABELED for r in records]
    totals = Counter(stratum)
    active = [s for s, ratio in enumerate(ratios) if ratio > 0]
    target = [{label: ratios[s] * n for label, n in totals.items()} for s in range(len(SPLITS))]
    assigned: list[Counter[str]] = [Counter() for _ in SPLITS]

    # Canonical order first (by each group's smallest path), so input order and hashing order never matter.
    ordered = sorted(groups, key=lambda g: min(str(records[i].path) for i in g))
    random.Random(seed).shuffle(ordered)
    ordered.sort(key=len, reverse=True)  # stable: equal-sized groups keep their shuffled order

    result: dict[int, str] = {}
    for group in ordered:
        counts = Counter(stratum[i] for i in group)

        def deficit(s: int, counts: Counter[str] = counts) -> float:
            return sum(n * (target[s][label] - assigned[s][label]) for label, n in counts.items())

        best = max(active, key=deficit)  # ties: the earlier split (train, then val)
        assigned[best].update(counts)
        for i in group:
            result[i] = SPLITS[best]
    return result


def split_summary(records: Sequence[Record]) -> dict[str, Any]:
    """Per split: images, patients (distinct known ids), images without an id, and per-class counts.

    A class's ``percent`` is its share of that class's images (so it is directly comparable to the
    requested ratio); the split's ``percent`` is its share of all images.
    """
    labels = sorted({r.label for r in records if r.label is not None})
    if any(r.label is None for r in records):
        labels.append(UNLABELED)
    totals = Counter(r.label or UNLABELED for r in records)
    out: dict[str, Any] = {"images": len(records), "classes": labels, "splits": {}}
    names = list(SPLITS) if any(r.split is not None for r in records) else []
    if any(r.split is None for r in records):
        names.append("unassigned")
    for name in names:
        members = [r for r in records if (r.split or "unassigned") == name]
        counts = Counter(r.label or UNLABELED for r in members)
        out["splits"][name] = {
            "images": len(members),
            "percent": _pct(len(members), len(records)),
            "patients": len({r.patient_id for r in members if r.patient_id}),
            "without_patient_id": sum(1 for r in members if not r.patient_id),
            "classes": {c: {"count": counts[c], "percent": _pct(counts[c], totals[c])} for c in labels},
        }
    return out


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def label_fraction(records: Sequence[Record], fraction: float, seed: int = 0) -> list[Record]:
    """The records with only ``fraction`` of the labelled **train** images kept; val and test untouched.

    For label-efficiency curves: whole patients are kept or dropped (never half a patient), per class, in
    one seeded order, so the subsets are nested (the 5% subset lies inside the 25% one) and every class keeps
    at least one patient. Unlabelled rows are kept: they only feed pretraining.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"a labelled fraction must be in (0, 1], got {fraction}")
    train = [i for i, r in enumerate(records) if r.split == "train" and r.label is not None]
    if fraction == 1 or not train:
        return list(records)
    patients: dict[str, list[int]] = defaultdict(list)
    for i in train:
        r = records[i]
        patients[r.patient_id or f"image:{r.path}"].append(i)
    by_class: dict[str, list[str]] = defaultdict(list)
    for patient, members in patients.items():  # a patient counts for its most frequent label
        labels = Counter(records[i].label for i in members)
        by_class[min(labels, key=lambda lab: (-labels[lab], lab))].append(patient)
    keep: set[int] = set()
    for label in sorted(by_class):
        units = sorted(by_class[label])
        random.Random(f"{seed}:{label}").shuffle(units)
        wanted = fraction * sum(len(patients[p]) for p in units)
        taken = 0
        for patient in units:
            if taken and taken + len(patients[patient]) / 2 > wanted:
                break
            keep.update(patients[patient])
            taken += len(patients[patient])
    dropped = set(train) - keep
    return [r for i, r in enumerate(records) if i not in dropped]


def fraction_mask(
    records: Sequence[Record], strata: Sequence[str | None], fraction: float, seed: int = 0
) -> list[bool]:
    """Which of ``records`` ``label_fraction`` keeps when each record's class is its ``strata`` entry (a
    label combination for multi-label data, one constant for masks; None: no target, always kept), so every
    task's label-efficiency subsets are nested, patient-grouped and seeded alike."""
    stratified = [replace(r, label=s) for r, s in zip(records, strata, strict=True)]
    chosen = {id(r) for r in label_fraction(stratified, fraction, seed)}
    return [id(r) in chosen for r in stratified]


def split_by(
    records: Sequence[Record],
    strata: Sequence[str | None],
    seed: int = 0,
    *,
    dedupe: bool = True,
    progress: ProgressFn = no_progress,
) -> list[Record]:
    """``split_records`` (default ratios) stratified by ``strata`` instead of the labels, which are kept: how
    multi-label and mask data get the same patient-grouped split as class labels."""
    stratified = [replace(r, label=s) for r, s in zip(records, strata, strict=True)]
    made = split_records(stratified, DEFAULT_RATIOS, seed, dedupe=dedupe, progress=progress).records
    return [replace(r, split=m.split) for r, m in zip(records, made, strict=True)]
