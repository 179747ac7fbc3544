"""What a study is, and the folder, split and labelled fractions every arm of it shares.

A study compares **arms** (an encoder used in one mode, ``probe`` or ``finetune``, with its training
recipes) at several labelled **fractions** of the training patients, all on one split, one seed and one
budget, and pairs them on the same test patients. The presets are ``cxrcae transfer`` (encoders x modes,
each compared with the first encoder) and ``cxrcae ablate`` (the CAE recipe against random-init twins).

The study folder ``OUT`` holds ``<kind>-settings.json`` (what a rerun must match to continue), the split
(``splits.csv``, made when DATA has no ``split`` column), and per fraction ``f<percent>/splits.csv``: the
val and test rows whole and a nested, patient-grouped, seeded share of the train rows (``data.splits``),
stratified by the task's targets (class, label combination, or one stratum for masks).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcae._atomic import atomic_write_text
from cxrcae.data import Record, load_records, write_records
from cxrcae.data.labels import LabelSource, read_multilabels
from cxrcae.data.splits import fraction_mask, split_by
from cxrcae.errors import CxrcaeError, DataError
from cxrcae.eval.probe import ProbeConfig
from cxrcae.locking import FOLDER_LOCK, hold
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.tasks import TASKS
from cxrcae.tasks.base import TargetSource
from cxrcae.train import FinetuneConfig

MODES = ("probe", "finetune")
SPLITS_NAME = "splits.csv"
MASKS_STRATUM = "all"
"""Mask data has no class to balance: every image is one stratum."""


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning run: its folder name under ``f<percent>/`` and its settings."""

    name: str
    config: FinetuneConfig


@dataclass(frozen=True)
class Arm:
    """An encoder in one mode. ``finetune`` arms train each recipe and keep the lowest validation loss;
    ``probe`` arms fit a linear probe on the encoder's frozen features."""

    name: str
    mode: str
    encoder: str | None
    """An encoder spec (``cxrcae.hub.encoders``); None: random initialisation (finetune)."""
    recipes: tuple[Recipe, ...] = ()
    label: str = ""
    """How tables name the encoder (the spec, shortened)."""

    @property
    def folder(self) -> str:
        """A probe cell's folder name under ``f<percent>/``."""
        return f"probe-{slug(self.encoder)}"


@dataclass
class StudySpec:
    """Everything ``run_points`` needs; ``settings`` is what a rerun must match to continue the folder."""

    kind: str
    """Names the files: ``<kind>.json``, ``<kind>.csv``, ``<kind>.png``, ``<kind>-settings.json``."""
    arms: tuple[Arm, ...]
    comparisons: tuple[tuple[str, str], ...]
    """(a, b) arm names: each point reports ``a - b``, paired on the test patients."""
    fractions: tuple[float, ...]
    settings: dict[str, Any]
    task: str = "classify"
    source: TargetSource = field(default_factory=TargetSource)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    batch_size: int = 32
    """Test images per forward pass when a fine-tuned checkpoint is scored."""
    n_bootstrap: int = 1000
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        if not self.fractions:
            raise CxrcaeError("--fractions needs at least one labelled fraction (e.g. 0.1,1)")
        for f in self.fractions:
            if not 0 < f <= 1:
                raise CxrcaeError(f"a labelled fraction must be in (0, 1], got {f}")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise CxrcaeError(f"two arms of one study share a name: {', '.join(names)}")
        for a, b in self.comparisons:
            if a not in names or b not in names:
                raise CxrcaeError(f"comparison {a} - {b} names an arm the study does not have")

    @property
    def label_source(self) -> LabelSource | None:
        """Multi-label targets (``--labels``/``--label-columns``), or None."""
        return label_source(self.source)

    @property
    def uses_label_column(self) -> bool:
        """Whether the manifest's ``label`` column is the target (the task's own answer when registered)."""
        task = TASKS.get(self.task)
        if task is not None:
            return task.uses_label_column
        return not (self.source.labels or self.source.label_columns or self.source.masks)

    def records(self, data: str | Path) -> list[Record]:
        return load_records(data, labeled=self.uses_label_column)

    def strata(self, records: Sequence[Record], where: str | Path) -> list[str | None]:
        """Each record's stratum: its class, its label combination, or one for masks; None when it has no
        target (an unlabelled row: never trained or scored on)."""
        labels = self.label_source
        if labels is not None:
            ml = read_multilabels(records, labels, where)
            by_record = {id(r): s for r, s in zip(ml.records, ml.strata(), strict=True)}
            return [by_record.get(id(r)) for r in records]
        if self.uses_label_column:
            return [r.label for r in records]
        return [MASKS_STRATUM] * len(records)

    def test_records(self, splits: Path) -> list[Record]:
        """The rows of ``splits`` that have a target (the ones every arm is scored on, test among them)."""
        records = self.records(splits)
        return [r for r, s in zip(records, self.strata(records, splits), strict=True) if s is not None]


def label_source(source: TargetSource) -> LabelSource | None:
    """The multi-label columns a target source names, or None (class labels or masks)."""
    return LabelSource.from_options(source.label_columns, source.labels, source.label_sep)


# ----------------------------------------------------------------------------------------------- folder


@contextmanager
def claimed(out: str | Path, spec: StudySpec) -> Iterator[Path]:
    """``with claimed(OUT, spec) as out:`` OUT is this study's (``claim``) and no other command may write
    into it until the block ends (the folder lock of ``cxrcae.locking``: a second writer is refused naming
    this process)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CxrcaeError(f"{out}: exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with hold(out, folder=True):
        yield claim(out, spec)


def claim(out: Path, spec: StudySpec) -> Path:
    """Create OUT, or continue it when it holds this very study; refuse a different study's folder."""
    out = Path(out).expanduser()
    settings = out / f"{spec.kind}-settings.json"
    wanted = json.loads(json.dumps(spec.settings))  # as it reads back from the file
    if settings.exists():
        saved = json.loads(settings.read_text())
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise CxrcaeError(
                f"{out}: holds a study with other settings ({', '.join(changed)}); choose another --out"
            )
        return out
    if out.exists() and (not out.is_dir() or any(p.name != FOLDER_LOCK for p in out.iterdir())):
        article = "an" if spec.kind[:1] in "aeiou" else "a"
        raise CxrcaeError(f"{out}: exists and is not {article} {spec.kind} study; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings, json.dumps(wanted, indent=2) + "\n")
    return out


def study_splits(data: str | Path, out: Path, spec: StudySpec, progress: ProgressFn = no_progress) -> Path:
    """DATA itself when it has a ``split`` column, else a patient-grouped split stratified by the targets,
    made once into ``OUT/splits.csv`` (a continued study keeps it; DATA is only checked to still exist)."""
    data = Path(data).expanduser()
    own = out / SPLITS_NAME
    if own.exists():
        if not data.exists():
            raise DataError(f"{data}: no such file or folder")
        return own
    records = spec.records(data)
    if any(r.split for r in records):
        return data.resolve()
    strata = spec.strata(records, data)
    if all(s is None for s in strata):
        raise DataError(f"{data}: no labelled images")
    write_records(split_by(records, strata, spec.seed, progress=progress), own)
    return own


def fraction_splits(splits: Path, folder: Path, fraction: float, spec: StudySpec) -> tuple[Path, int]:
    """``folder/splits.csv``: the rows ``fraction`` keeps (written once), and how many train images with a
    target it holds."""
    records = spec.records(splits)
    strata = spec.strata(records, splits)
    keep = fraction_mask(records, strata, fraction, spec.seed)
    path = folder / SPLITS_NAME
    if not path.exists():
        write_records([r for r, k in zip(records, keep, strict=True) if k], path)
    train = sum(
        1 for r, s, k in zip(records, strata, keep, strict=True) if k and s is not None and r.split == "train"
    )
    return path, train


def percent(fraction: float) -> str:
    """0.05 -> ``5``, 0.125 -> ``12p5``: the ``f<percent>`` folder of a fraction."""
    return f"{fraction * 100:g}".replace(".", "p")


def slug(spec: str | None) -> str:
    """A folder name for an encoder spec: readable, and unique (a hash is added when characters went)."""
    text = "random" if spec is None else str(spec)
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:48] or "encoder"
    if clean != text:
        clean += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return clean
