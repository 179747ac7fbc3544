"""Datasets as plain records: read a class-folder tree or a manifest/splits CSV, write it back portably.

A ``Record`` is one image with what we know about it (label, patient, source, split, other manifest
columns). Everything downstream (splitting, datasets, training provenance) works on lists of records, so
the on-disk layout is decided here and nowhere else. Missing files and malformed CSVs are caught at load
time with one clear message, not deep inside a DataLoader worker.

Other columns whose value names an image file (a segmentation mask per structure: ``left_lung``,
``heart``, ...) are paths like ``path``: a relative one is read against the manifest's folder and written back
relative to the new CSV's folder, so a manifest and the splits CSVs written from it keep pointing at the same
files. A folder holding ``images/`` and ``masks/<structure>/`` (same file names) reads, unlabelled, as the
images with one mask column per structure.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcae._atomic import atomic_open
from cxrcae.errors import DataError
from cxrcae.io import IMAGE_EXTENSIONS, find_images

UNLABELED = "UNLABELED"
"""Manifest label meaning "no label"; read as ``None`` and written back as this string."""

SPLITS = ("train", "val", "test")
CORE_COLUMNS = ("path", "label", "patient_id", "source")
SPLIT_COLUMN = "split"
IMAGES_FOLDER, MASKS_FOLDER = "images", "masks"
_SHOW = 5  # how many offending paths an error message lists


@dataclass(frozen=True)
class Record:
    """One image. ``label``/``patient_id``/``source``/``split`` are None when unknown."""

    path: Path
    label: str | None = None
    patient_id: str | None = None
    source: str | None = None
    split: str | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False, compare=True)

    def value(self, column: str) -> str | None:
        """This image's value in a manifest column (a core field or one kept in ``extra``); None if empty.

        Lets code that groups or filters by a user-named column (``evaluate --by view``) treat every column
        alike, whether the Record has a field for it or not.
        """
        if column in _FIELDS:
            value = getattr(self, column)
            return None if value is None else str(value)
        return self.extra.get(column) or None


_FIELDS = (*CORE_COLUMNS, SPLIT_COLUMN)


def record_columns(records: Iterable[Record]) -> list[str]:
    """The columns with a value on at least one record: core fields first, then extras in first-seen order."""
    records = list(records)
    core = [c for c in _FIELDS if any(r.value(c) is not None for r in records)]
    extra: dict[str, None] = {}
    for r in records:
        extra.update({c: None for c, v in r.extra.items() if v})
    return core + list(extra)


def class_names(records: Iterable[Record]) -> list[str]:
    """Sorted label names (unlabeled excluded): the stable index order saved with every model."""
    return sorted({r.label for r in records if r.label is not None})


def load_records(data: str | Path, *, labeled: bool = True) -> list[Record]:
    """Read ``root/<CLASS>/**/image`` folders, a manifest CSV or a splits CSV into records.

    With ``labeled=False`` any folder of images (searched recursively) is accepted and labels may be absent,
    which is what autoencoder pretraining needs. Raises ``DataError`` naming the problem.
    """
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        records = _load_folder(path) if labeled else _load_unlabeled_folder(path)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        records = _load_csv(path, labeled=labeled)
    else:
        kind = path.suffix or "extension-less"
        raise DataError(f"{path}: expected a folder of images or a manifest .csv, got a {kind} file")
    if not records:
        raise DataError(f"{path}: no images found")
    return records


def _abspath(path: str | Path) -> Path:
    """Absolute and normalised, but symlinks kept (a symlinked tree stays where the user put it)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _label(value: str | None) -> str | None:
    value = (value or "").strip()
    return None if not value or value.upper() == UNLABELED else value


def _optional(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _load_folder(root: Path) -> list[Record]:
    """``root/<CLASS>/**``: each visible sub-folder is a class; ``UNLABELED/`` holds unlabeled images."""

    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DataError(
            f"{root}: {len(loose)} image(s) directly in the dataset root ({_preview(loose)}); expected "
            "root/<CLASS>/image files (use an unlabeled load for a flat folder)"
        )
    records = []
    for class_dir in class_dirs:
        files, _ = find_images([class_dir], recursive=True)
        label = _label(class_dir.name)
        records += [Record(path=_abspath(f), label=label) for f in files]
    if not records:
        raise DataError(f"{root}: no class folders with images; expected root/<CLASS>/image files")
    return records


def _load_unlabeled_folder(root: Path) -> list[Record]:
    if (root / IMAGES_FOLDER).is_dir() and (root / MASKS_FOLDER).is_dir():
        return _load_mask_folders(root)
    files, _ = find_images([root], recursive=True)
    return [Record(path=_abspath(f)) for f in files]


def _load_mask_folders(root: Path) -> list[Record]:
    """``root/images/**`` with ``root/masks/<structure>/**``: each image gets a column per structure naming
    the mask of the same name (any image extension); a mask that is not there keeps the expected path, so
    the segmentation task's check names the missing file."""
    images_dir, masks_dir = root / IMAGES_FOLDER, root / MASKS_FOLDER
    structures = sorted(p for p in masks_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not structures:
        raise DataError(f"{masks_dir}: no masks/<structure>/ folders of masks")
    by_stem: dict[str, dict[str, Path]] = {}
    for folder in structures:
        files, _ = find_images([folder], recursive=True)
        by_stem[folder.name] = {f.relative_to(folder).with_suffix("").as_posix(): f for f in files}
    images, _ = find_images([images_dir], recursive=True)
    records = []
    for image in images:
        relative = image.relative_to(images_dir)
        key = relative.with_suffix("").as_posix()
        extra = {s.name: str(_abspath(by_stem[s.name].get(key, s / relative))) for s in structures}
        records.append(Record(path=_abspath(image), extra=extra))
    return records


def is_file_value(value: str | None) -> bool:
    """Whether a manifest value names an image file (a mask column), by its extension."""
    value = (value or "").strip()
    return bool(value) and "://" not in value and Path(value).suffix.lower() in IMAGE_EXTENSIONS


def _file_value(value: str, base: Path) -> str:
    """An image-file value made absolute against the manifest's folder (other values as they are)."""
    if not is_file_value(value):
        return value
    path = Path(os.path.expanduser(value.strip()))
    return str(_abspath(path if path.is_absolute() else base / path))


def _load_csv(csv_path: Path, *, labeled: bool) -> list[Record]:
    base = _abspath(csv_path).parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=_delimiter(f))
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: malformed CSV ({exc})") from None

    required = ["path", "label"] if labeled else ["path"]
    missing = [c for c in required if c not in columns]
    if missing:
        found = ", ".join(columns) if columns else "none"
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (found: {found})")

    extra_columns = [c for c in columns if c not in CORE_COLUMNS and c != SPLIT_COLUMN and c]
    records, absent, bad_splits = [], [], []
    for line, row in enumerate(rows, start=2):
        raw = (row.get("path") or "").strip()
        if not raw:
            raise DataError(f"{csv_path}: line {line}: empty path")
        path = Path(os.path.expanduser(raw))
        path = _abspath(path if path.is_absolute() else base / path)
        if not path.is_file():
            absent.append(path)
        split = _optional(row.get(SPLIT_COLUMN))
        if split is not None and split not in SPLITS:
            bad_splits.append(f"line {line}: {split!r}")
        records.append(
            Record(
                path=path,
                label=_label(row.get("label")),
                patient_id=_optional(row.get("patient_id")),
                source=_optional(row.get("source")),
                split=split,
                extra={c: _file_value(row.get(c) or "", base) for c in extra_columns},
            )
        )
    if absent:
        raise DataError(
            f"{csv_path}: {len(absent)} of {len(records)} listed file(s) not found: {_preview(absent)}"
        )
    if bad_splits:
        raise DataError(
            f"{csv_path}: split must be one of {', '.join(SPLITS)}; got {'; '.join(bad_splits[:_SHOW])}"
            + (f" (and {len(bad_splits) - _SHOW} more)" if len(bad_splits) > _SHOW else "")
        )
    return records


def _delimiter(f: Any) -> str:
    """Tab when the header line has one, else comma; ``f`` is left at its start."""
    sample = f.read(8192)
    f.seek(0)
    return "\t" if "\t" in sample.split("\n", 1)[0] else ","


def manifest_columns(csv_path: str | Path) -> list[str]:
    """The header of a manifest CSV as ``load_records`` reads it (names stripped), to tell a missing column
    from one that is empty in every row."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=_delimiter(f)), [])
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: malformed CSV ({exc})") from None
    return [c.strip() for c in header]


def _preview(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_SHOW])
    return shown + (f", ... ({len(paths) - _SHOW} more)" if len(paths) > _SHOW else "")


def _relative_to(path: Path, folder: Path) -> str:
    """Relative (POSIX) when ``path`` is under ``folder``, so the CSV travels with its data; else absolute."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _written_value(value: str, folder: Path) -> str:
    """An absolute image-file value relative to the CSV's folder when under it (as ``path`` is written)."""
    if is_file_value(value) and Path(value).is_absolute():
        return _relative_to(_abspath(value), folder)
    return value


def write_records(records: Sequence[Record], path: str | Path) -> Path:
    """Write records as a manifest/splits CSV, atomically (a crash never leaves half a file).

    Columns: path, label, patient_id, source, every extra manifest column (first-seen order), then split
    when any record has one. ``load_records`` reads the file back to equal records.
    """
    out = _abspath(path)
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    extra_columns: dict[str, None] = {}
    for r in records:
        extra_columns.update(dict.fromkeys(r.extra))
    has_split = any(r.split is not None for r in records)
    columns = [*CORE_COLUMNS, *extra_columns, *([SPLIT_COLUMN] if has_split else [])]

    with atomic_open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in records:
            row = {
                "path": _relative_to(_abspath(r.path), folder),
                "label": r.label if r.label is not None else UNLABELED,
                "patient_id": r.patient_id or "",
                "source": r.source or "",
                **{c: _written_value(r.extra.get(c, ""), folder) for c in extra_columns},
            }
            if has_split:
                row[SPLIT_COLUMN] = r.split or ""
            writer.writerow(row)
    return out


def dataset_fingerprint(records: Iterable[Record]) -> str:
    """sha256 over sorted (path relative to the records' common folder, label, split).

    Saved with every trained model so a result can be tied to the exact data and split it saw, even after
    the dataset folder has moved to another machine.
    """
    records = list(records)
    if not records:
        return hashlib.sha256(b"").hexdigest()
    paths = [str(_abspath(r.path)) for r in records]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else Path(paths[0]).parent
    rows = sorted(
        "\t".join((Path(p).relative_to(common).as_posix(), r.label or UNLABELED, r.split or ""))
        for p, r in zip(paths, records, strict=True)
    )
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.encode("utf-8") + b"\n")
    return digest.hexdigest()


def select_records(
    records: Sequence[Any], split: str | None, data: str | Path
) -> tuple[list[Any], str | None, list[str]]:
    """The rows to evaluate: the ``split`` rows of a splits CSV, or every row of a folder/manifest.

    The split used is returned; None means the data has no split column and is an external set.
    """
    notes: list[str] = []
    splits = sorted({r.split for r in records if r.split is not None})
    if splits:
        if split is None:
            raise DataError(f"{data} has a split column ({', '.join(splits)}); choose one with --split")
        chosen = [r for r in records if r.split == split]
        if not chosen:
            raise DataError(f"{data}: no rows with split={split!r} (splits present: {', '.join(splits)})")
        return chosen, split, notes
    notes.append(
        f"{data} has no split column: evaluated as an external set (all {len(records)} rows; "
        "not the held-out split of a training run)"
    )
    return list(records), None, notes


def check_labels(
    records: Sequence[Any], class_names: Sequence[str], data: str | Path
) -> tuple[list[Any], list[str]]:
    """Drop unlabelled rows (noted); refuse labels the model does not know; note classes with no images."""
    notes: list[str] = []
    labelled = [r for r in records if r.label is not None]
    if len(labelled) < len(records):
        notes.append(f"{len(records) - len(labelled)} unlabelled image(s) skipped")
    if not labelled:
        raise DataError(f"{data}: no labelled images to evaluate")
    unknown = sorted({r.label for r in labelled} - set(class_names))
    if unknown:
        raise DataError(
            f"{data}: label(s) {', '.join(unknown)} are not classes of the model "
            f"({', '.join(class_names)}); evaluate on data labelled with the model's classes"
        )
    absent = [c for c in class_names if c not in {r.label for r in labelled}]
    if absent:
        notes.append(f"no images of class {', '.join(absent)}: its recall, F1 and AUC are undefined")
    return labelled, notes
