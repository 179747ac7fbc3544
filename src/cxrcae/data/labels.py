"""Multi-label targets: a 0/1 matrix (images x labels) from a manifest, and the checks that make it usable.

A manifest holds several findings per image in one of two ways:

- one 0/1 column per label (``--label-columns Atelectasis,Effusion,Mass``), as wide tables do;
- one column of separated names (``--labels finding --label-sep /``), as ieee8023's
  ``Pneumonia/Viral/COVID-19`` or NIH ChestX-ray14's ``Finding Labels`` (``Effusion|Mass``, separator ``|``).

An empty cell means "not labelled": the image is left out (and counted), never read as "no finding". Every
problem is one ``DataError`` line naming the file and the column: a missing column, a column empty in every
row, a value other than 0/1, a label that never occurs in the train split. Torch-free, like all of ``data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrcae.data.records import Record, manifest_columns
from cxrcae.errors import DataError

DEFAULT_SEP = "|"
_TRUE, _FALSE = frozenset({"1", "1.0"}), frozenset({"0", "0.0"})
_SHOW = 3


@dataclass(frozen=True)
class LabelSource:
    """Where the labels are: ``columns`` (0/1 columns, one per label) or ``column`` split on ``sep``."""

    columns: tuple[str, ...] = ()
    column: str | None = None
    sep: str = DEFAULT_SEP

    def __post_init__(self) -> None:
        if bool(self.columns) == bool(self.column):
            raise DataError(
                "multi-label data: give either --label-columns A,B,C or --labels COLUMN, not both"
            )
        if self.column is not None and not self.sep:
            raise DataError("--label-sep must not be empty")
        twice = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if twice:
            raise DataError(f"--label-columns names {', '.join(twice)} more than once")

    @classmethod
    def from_options(
        cls, label_columns: str | Sequence[str] | None, labels: str | None, sep: str | None = None
    ) -> LabelSource | None:
        """The CLI options as a source; None when neither is given (single-label data)."""
        if isinstance(label_columns, str):
            label_columns = [c.strip() for c in label_columns.split(",") if c.strip()]
        columns = tuple(label_columns or ())
        column = labels.strip() if labels and labels.strip() else None
        if not columns and column is None:
            if sep is not None:
                raise DataError("--label-sep needs --labels COLUMN")
            return None
        return cls(columns=columns, column=column, sep=DEFAULT_SEP if sep is None else sep)

    def describe(self) -> dict[str, Any]:
        if self.column is not None:
            return {"column": self.column, "sep": self.sep}
        return {"columns": list(self.columns)}


@dataclass(frozen=True)
class MultiLabels:
    """The labelled records (input order kept), their (n, k) 0/1 ``targets`` and the label ``names``."""

    records: list[Record]
    targets: np.ndarray
    names: tuple[str, ...]
    unlabelled: int = 0
    """Records left out because their label cell(s) were empty."""

    def strata(self) -> list[str]:
        """Each record's label combination ("A+C", "(none)"): what a stratified split balances."""
        return [
            "+".join(n for n, v in zip(self.names, row, strict=True) if v) or "(none)" for row in self.targets
        ]


def read_multilabels(records: Sequence[Record], source: LabelSource, data: str | Path) -> MultiLabels:
    """The 0/1 targets of ``records`` (loaded from the manifest ``data``) as ``source`` describes them.

    Names are the 0/1 columns in the order given, or the sorted distinct names of the string column.
    """
    path = Path(data)
    if not path.is_file():
        raise DataError(
            f"{data}: multi-label labels are read from a manifest CSV's columns; this is a "
            f"{'folder' if path.is_dir() else 'missing path'}"
        )
    header = set(manifest_columns(path))
    wanted = [source.column] if source.column is not None else list(source.columns)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(
            f"{data}: no column {', '.join(repr(c) for c in missing)} (found: {', '.join(sorted(header))})"
        )
    empty = [c for c in wanted if all(r.value(c) is None for r in records)]
    if empty:
        raise DataError(f"{data}: column {', '.join(repr(c) for c in empty)} is empty in every row")
    if source.column is not None:
        return _from_names(records, source.column, source.sep)
    return _from_columns(records, source.columns, data)


def _from_names(records: Sequence[Record], column: str, sep: str) -> MultiLabels:
    kept, rows = [], []
    for r in records:
        names = {t.strip() for t in (r.value(column) or "").split(sep)} - {""}
        if names:
            kept.append(r)
            rows.append(names)
    names = tuple(sorted(set().union(*rows)))
    index = {n: i for i, n in enumerate(names)}
    targets = np.zeros((len(kept), len(names)), dtype=np.uint8)
    for i, row in enumerate(rows):
        targets[i, [index[n] for n in row]] = 1
    return MultiLabels(kept, targets, names, unlabelled=len(records) - len(kept))


def _from_columns(records: Sequence[Record], columns: Sequence[str], data: str | Path) -> MultiLabels:
    kept, rows = [], []
    bad: dict[str, list[tuple[str, Path]]] = {}
    for r in records:
        values = [r.value(c) for c in columns]
        if any(v is None for v in values):
            continue
        row = []
        for c, v in zip(columns, values, strict=True):
            text = str(v).strip()
            if text not in _TRUE and text not in _FALSE:
                bad.setdefault(c, []).append((text, r.path))
            row.append(text in _TRUE)
        kept.append(r)
        rows.append(row)
    if bad:
        column, found = next(iter(bad.items()))
        shown = "; ".join(f"{v!r} ({p.name})" for v, p in found[:_SHOW])
        more = f" and {len(found) - _SHOW} more" if len(found) > _SHOW else ""
        raise DataError(
            f"{data}: column {column!r} must hold 0 or 1 (empty = not labelled); found {shown}{more}"
        )
    targets = np.asarray(rows, dtype=np.uint8).reshape(len(kept), len(columns))
    return MultiLabels(kept, targets, tuple(columns), unlabelled=len(records) - len(kept))


def check_train_labels(
    targets: np.ndarray, names: Sequence[str], splits: Sequence[str | None], data: str | Path
) -> None:
    """Every label needs a positive image in the train split: one line naming those that have none (and
    where they do occur: a label present in test but never in train cannot be learned or scored fairly)."""
    split = np.asarray([s or "" for s in splits])
    y = np.asarray(targets, dtype=bool)
    problems = []
    for k, name in enumerate(names):
        if y[split == "train", k].any():
            continue
        elsewhere = [
            f"{s} ({int(y[split == s, k].sum())})" for s in ("val", "test") if y[split == s, k].any()
        ]
        problems.append(
            f"{name!r} is in {' and '.join(elsewhere)} but never in train"
            if elsewhere
            else f"{name!r} has no positive image"
        )
    if problems:
        raise DataError(f"{data}: label {'; '.join(problems)}; drop it or re-split")


def targets_for(
    records: Sequence[Record], source: LabelSource, names: Sequence[str], where: str | Path
) -> MultiLabels:
    """The 0/1 targets of ``records`` in the fixed label order ``names`` (a model's), unlabelled records
    left out: what a trained multi-label model is fitted, validated and scored against. A name the records
    use that ``names`` lacks is a one-line error (the model cannot score it)."""
    if source.column is not None:
        found = _from_names(records, source.column, source.sep)
    else:
        found = _from_columns(records, source.columns, where)
    unknown = sorted(set(found.names) - set(names))
    if unknown:
        raise DataError(
            f"{where}: label(s) {', '.join(map(repr, unknown[:_SHOW]))} are not among the model's labels "
            f"({', '.join(names)})"
        )
    index = [found.names.index(n) if n in found.names else -1 for n in names]
    targets = np.zeros((len(found.records), len(names)), dtype=np.uint8)
    for j, i in enumerate(index):
        if i >= 0:
            targets[:, j] = found.targets[:, i]
    return MultiLabels(found.records, targets, tuple(names), found.unlabelled)


def label_source(described: dict[str, Any]) -> LabelSource:
    """A ``LabelSource`` back from its ``describe()`` (as config.json stores it)."""
    if described.get("column"):
        return LabelSource(column=str(described["column"]), sep=str(described.get("sep") or DEFAULT_SEP))
    return LabelSource(columns=tuple(described.get("columns") or ()))
