"""Dataset hygiene before training: duplicates, leakage between splits, and classes that come from one source.

Public COVID chest X-ray collections overlap (the same image re-encoded, resized or cropped in several
datasets) and mix sources per class, two well-known ways to inflate results. ``audit_records`` finds:

- exact duplicates: equal ``pixel_hash`` (decoded pixels, so PNG and TIFF copies of one image match);
- near duplicates: perceptual hashes (``imagehash.phash``, 64 bits) within ``near_threshold`` bits;
- leakage: a patient, or a duplicate group, present in more than one split;
- source bias: per class, the share of its images that come from its largest source.

Checks that need a model live in higher layers and plug in through ``checks`` (``AuditCheck``): each
returns an ``AuditSection`` that the report stores, serialises and renders, so ``cxrcae audit --model``
adds ``cxrcae.eval.shortcut``'s probe without this module importing any model code.

Hashing runs on ``cxrcae.io.hash_files``' thread pool; pixel hashes already computed by a split
(``SplitResult.pixel_hashes``) can be passed in and are not computed again. Unreadable images are listed
and skipped, never fatal. ``LEAKAGE_EXIT_CODE`` is what ``cxrcae audit`` returns when it finds leakage, so
it can gate a pipeline.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import imagehash
import numpy as np
from PIL import Image

from cxrcae._atomic import atomic_write_text
from cxrcae.data.groups import UnionFind
from cxrcae.data.records import Record
from cxrcae.io import FileHashes, hash_files, load_xray, pixel_hash
from cxrcae.progress import ProgressFn, no_progress

LEAKAGE_EXIT_CODE = 3
DEFAULT_NEAR_THRESHOLD = 2
"""Hamming bits out of 64. Measured on the 8,559 shared CXRs: the 40 published originals vs their resized
JPEG copies differ by 0-2 bits; at <= 2 bits 9 pairs are flagged (some true cross-source copies, e.g.
ieee8023 images inside radiography-db), at <= 4 bits 268, mostly different images."""
DEFAULT_DOMINANCE = 0.8
_PHASH_DECODE_SIZE = 128  # phash looks at 32x32: decoding big JPEGs at reduced size loses nothing
_UNKNOWN = "(unknown)"
HASH_TASK = "hashing images"


@dataclass(frozen=True)
class ImageHash:
    """Hashes of one image, or why it could not be read."""

    exact: str | None = None
    phash: int | None = None
    error: str | None = None


@dataclass
class DuplicateGroup:
    """Images that are the same picture: ``exact`` (same pixels) or ``near`` (perceptual hash within t)."""

    kind: str
    members: list[int]
    records: Sequence[Record] = field(repr=False, default=())
    max_distance: int = 0

    def _values(self, attr: str) -> list[str]:
        return sorted({getattr(self.records[i], attr) or _UNKNOWN for i in self.members})

    @property
    def sources(self) -> list[str]:
        return self._values("source")

    @property
    def splits(self) -> list[str]:
        return sorted({self.records[i].split for i in self.members if self.records[i].split})

    @property
    def labels(self) -> list[str]:
        return sorted({self.records[i].label or "UNLABELED" for i in self.members})

    @property
    def cross_source(self) -> bool:
        return len(self.sources) > 1

    @property
    def cross_split(self) -> bool:
        return len(self.splits) > 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "paths": [str(self.records[i].path) for i in self.members],
            "sources": self.sources,
            "splits": self.splits,
            "labels": self.labels,
            "cross_source": self.cross_source,
            "cross_split": self.cross_split,
            "label_conflict": len(self.labels) > 1,
            "max_distance": self.max_distance,
        }


class AuditSection(Protocol):
    """A finding added to the audit by a check from a higher layer (such as the model shortcut probe)."""

    key: str
    """Its key in the JSON report."""
    title: str
    notes: list[str]

    @property
    def warnings(self) -> list[str]: ...

    def as_dict(self) -> dict[str, Any]: ...

    def markdown(self) -> str: ...

    def table(self) -> tuple[list[str], list[list[Any]]]: ...


AuditCheck = Callable[[Sequence[Record], ProgressFn], AuditSection]
"""``check(records, progress) -> AuditSection``: an extra audit step, run after the hashing checks."""


@dataclass
class AuditReport:
    """Everything ``audit_records`` found; ``leakage`` is what gates a pipeline."""

    images: int
    unreadable: list[tuple[str, str]]
    exact_groups: list[DuplicateGroup]
    near_groups: list[DuplicateGroup]
    patient_leaks: list[dict[str, Any]]
    class_source: dict[str, dict[str, int]]
    dominant: list[dict[str, Any]]
    has_splits: bool
    near_threshold: int | None
    dominance_threshold: float
    sections: list[AuditSection] = field(default_factory=list)

    @property
    def section_warnings(self) -> list[str]:
        return [w for s in self.sections for w in s.warnings]

    @property
    def leaking_groups(self) -> list[DuplicateGroup]:
        return [g for g in self.exact_groups + self.near_groups if g.cross_split]

    @property
    def leakage(self) -> bool:
        return bool(self.patient_leaks or self.leaking_groups)

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
            "has_splits": self.has_splits,
            "near_threshold": self.near_threshold,
            "exact_duplicate_groups": [g.as_dict() for g in self.exact_groups],
            "near_duplicate_groups": [g.as_dict() for g in self.near_groups],
            "patient_leaks": self.patient_leaks,
            "class_source": self.class_source,
            "dominance_threshold": self.dominance_threshold,
            "dominant_sources": self.dominant,
            "leakage": self.leakage,
            **{s.key: s.as_dict() for s in self.sections},
            "summary": self.summary(),
        }

    def summary(self) -> dict[str, int]:
        return {
            "images": self.images,
            "unreadable": len(self.unreadable),
            "exact_duplicate_groups": len(self.exact_groups),
            "exact_duplicate_images": sum(len(g.members) for g in self.exact_groups),
            "near_duplicate_groups": len(self.near_groups),
            "cross_source_groups": sum(g.cross_source for g in self.exact_groups + self.near_groups),
            "cross_split_groups": len(self.leaking_groups),
            "patients_in_several_splits": len(self.patient_leaks),
            "dominated_classes": len(self.dominant),
            **({"check_warnings": len(self.section_warnings)} if self.sections else {}),
        }


def hash_images(
    paths: Sequence[Path],
    *,
    workers: int | None = None,
    progress: ProgressFn = no_progress,
    pixel_hashes: FileHashes[str] | None = None,
) -> list[ImageHash]:
    """Exact and perceptual hash of each path, in input order; read failures are returned, not raised.

    Runs on ``hash_files``' thread pool (decoders release the GIL). ``pixel_hashes`` (for instance
    ``SplitResult.pixel_hashes``) supplies exact hashes computed earlier: those files are only decoded small
    for the perceptual hash, and the files it lists as unreadable are reported with its reason, not retried.
    """
    known: FileHashes[str] = pixel_hashes or FileHashes()

    def exact_and_phash(path: Path) -> tuple[str, int]:
        return _exact_and_phash(path, known.hashes.get(path))

    todo = [p for p in dict.fromkeys(paths) if p not in known.errors]
    found = hash_files(todo, exact_and_phash, workers=workers, progress=progress, task=HASH_TASK)
    out: list[ImageHash] = []
    for path in paths:
        if path in known.errors:
            out.append(ImageHash(error=known.errors[path]))
        elif path in found.errors:
            out.append(ImageHash(error=found.errors[path]))
        else:
            exact, phash = found.hashes[path]
            out.append(ImageHash(exact=exact, phash=phash))
    return out


def _exact_and_phash(path: Path, exact: str | None = None) -> tuple[str, int]:
    """``pixel_hash`` (unless given) and the 64-bit perceptual hash of one file; raises on a read failure."""
    if exact is None:
        exact = pixel_hash(path)
    pixels = load_xray(path, target_size=_PHASH_DECODE_SIZE)
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    bits = np.packbits(imagehash.phash(image).hash.flatten())
    return exact, int.from_bytes(bits.tobytes(), "big")


def audit_records(
    records: Sequence[Record],
    *,
    near_threshold: int | None = DEFAULT_NEAR_THRESHOLD,
    dominance: float = DEFAULT_DOMINANCE,
    workers: int | None = None,
    progress: ProgressFn = no_progress,
    hashes: Sequence[ImageHash] | None = None,
    pixel_hashes: FileHashes[str] | None = None,
    checks: Sequence[AuditCheck] = (),
) -> AuditReport:
    """Audit a manifest's or splits file's records; ``near_threshold=None`` skips near duplicates.

    ``hashes`` (one per record) skips hashing altogether; ``pixel_hashes`` (``SplitResult.pixel_hashes``
    of the same files) skips only the exact pixel hashing. Either way the report is the same. ``checks``
    run last, each adding its section (``cxrcae.eval.shortcut.ShortcutCheck`` for the model probe).
    """
    records = list(records)
    if hashes is None:
        paths = [r.path for r in records]
        hashes = hash_images(paths, workers=workers, progress=progress, pixel_hashes=pixel_hashes)
    unreadable = [(str(r.path), h.error) for r, h in zip(records, hashes, strict=True) if h.error]
    exact = exact_duplicate_groups(records, hashes)
    near = near_duplicate_groups(records, hashes, near_threshold) if near_threshold is not None else []
    table = class_source_table(records)
    return AuditReport(
        images=len(records),
        unreadable=unreadable,
        exact_groups=exact,
        near_groups=near,
        patient_leaks=patient_leaks(records),
        class_source=table,
        dominant=dominant_sources(table, dominance),
        has_splits=any(r.split for r in records),
        near_threshold=near_threshold,
        dominance_threshold=dominance,
        sections=[check(records, progress) for check in checks],
    )


def exact_duplicate_groups(records: Sequence[Record], hashes: Sequence[ImageHash]) -> list[DuplicateGroup]:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if h.exact:
            by_hash[h.exact].append(i)
    return [DuplicateGroup("exact", idx, records) for idx in by_hash.values() if len(idx) > 1]


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


def near_pairs(phashes: np.ndarray, threshold: int, block: int = 256) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= threshold, in blocks to bound memory."""
    n = len(phashes)
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, n, block):
        rows = phashes[start : start + block]
        dist = _popcount(rows[:, None] ^ phashes[None, start:])
        ii, jj = np.nonzero(dist <= threshold)
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            a, b = start + i, start + j
            if a < b:
                pairs.append((a, b, int(dist[i, j])))
    return pairs


def near_duplicate_groups(
    records: Sequence[Record], hashes: Sequence[ImageHash], threshold: int
) -> list[DuplicateGroup]:
    """Clusters of perceptually near images that are not all one exact-duplicate group.

    Exact duplicates are collapsed to one representative first, then representatives within ``threshold``
    bits are joined transitively (union-find), so a chain of near copies is reported as one group.
    """
    reps: dict[str, int] = {}
    members: dict[int, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if h.exact is None or h.phash is None:
            continue
        rep = reps.setdefault(h.exact, i)
        members[rep].append(i)
    rep_ids = list(members)
    if len(rep_ids) < 2:
        return []
    values = np.array([hashes[i].phash for i in rep_ids], dtype=np.uint64)
    clusters = UnionFind(len(rep_ids))
    edges = near_pairs(values, threshold)
    for a, b, _ in edges:
        clusters.union(a, b)
    worst: dict[int, int] = defaultdict(int)
    for a, _, d in edges:
        root = clusters.find(a)
        worst[root] = max(worst[root], d)
    groups = []
    for ks in clusters.groups():
        if len(ks) > 1:
            idx = sorted(i for k in ks for i in members[rep_ids[k]])
            groups.append(DuplicateGroup("near", idx, records, max_distance=worst[clusters.find(ks[0])]))
    return groups


def patient_leaks(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Patients (per source: ids are only unique within one) with images in more than one split."""
    splits: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in records:
        if r.patient_id and r.split:
            splits[(r.source or "", r.patient_id)][r.split] += 1
    return [
        {"source": source or None, "patient_id": pid, "splits": dict(sorted(count.items()))}
        for (source, pid), count in sorted(splits.items())
        if len(count) > 1
    ]


def class_source_table(records: Sequence[Record]) -> dict[str, dict[str, int]]:
    """label -> source -> image count (UNLABELED and unknown sources included)."""
    table: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        table[r.label or "UNLABELED"][r.source or _UNKNOWN] += 1
    return {label: dict(sorted(table[label].items())) for label in sorted(table)}


def dominant_sources(table: dict[str, dict[str, int]], threshold: float) -> list[dict[str, Any]]:
    """Classes whose largest source supplies more than ``threshold`` of them, when sources differ.

    A model can then learn the source (scanner, hospital, age group) instead of the disease. Only checked
    when the data has more than one source; UNLABELED is not a class.
    """
    all_sources = {s for row in table.values() for s in row}
    if len(all_sources) < 2:
        return []
    out = []
    for label, row in table.items():
        if label == "UNLABELED":
            continue
        total = sum(row.values())
        source, top = max(row.items(), key=lambda kv: kv[1])
        if total and top / total > threshold:
            out.append({"label": label, "source": source, "share": round(top / total, 4), "images": total})
    return out


def to_markdown(report: AuditReport, title: str = "Dataset audit", limit: int = 50) -> str:
    """A human-readable report (``--report FILE.md``)."""
    s = report.summary()
    lines = [f"# {title}", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in s.items()]
    lines += ["", f"**Leakage: {'YES' if report.leakage else 'no'}**", ""]
    sources = sorted({src for row in report.class_source.values() for src in row})
    lines += ["## Class x source", "", "| class | " + " | ".join(sources) + " | total |"]
    lines += ["|---" * (len(sources) + 2) + "|"]
    for label, row in report.class_source.items():
        cells = [str(row.get(src, 0)) for src in sources]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sum(row.values())} |")
    for d in report.dominant:
        lines.append(f"\n> Warning: {d['share']:.0%} of {d['label']} comes from {d['source']}.")
    for section in report.sections:
        lines += ["", section.markdown().rstrip("\n")]
    if report.patient_leaks:
        lines += [
            "",
            "## Patients in more than one split",
            "",
            "| source | patient | splits |",
            "|---|---|---|",
        ]
        for leak in report.patient_leaks[:limit]:
            splits = ", ".join(f"{k}: {v}" for k, v in leak["splits"].items())
            lines.append(f"| {leak['source'] or ''} | {leak['patient_id']} | {splits} |")
    for name, groups in (("Exact duplicates", report.exact_groups), ("Near duplicates", report.near_groups)):
        if groups:
            lines += ["", f"## {name} ({len(groups)} groups)", ""]
            for g in groups[:limit]:
                flags = [
                    f for f, on in (("cross-split", g.cross_split), ("cross-source", g.cross_source)) if on
                ]
                lines.append(f"- {len(g.members)} images {'[' + ', '.join(flags) + ']' if flags else ''}")
                lines += [f"  - `{g.records[i].path}`" for i in g.members]
    if report.unreadable:
        lines += ["", f"## Unreadable ({len(report.unreadable)})", ""]
        lines += [f"- `{p}`: {r}" for p, r in report.unreadable[:limit]]
    return "\n".join(lines) + "\n"


def write_report(report: AuditReport, path: str | Path, title: str = "Dataset audit") -> Path:
    """The full report as JSON (``.json``) or Markdown (anything else), written atomically."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".json":
        text = json.dumps(report.as_dict(), indent=2, default=str) + "\n"
    else:
        text = to_markdown(report, title=title)
    atomic_write_text(path, text)
    return path
