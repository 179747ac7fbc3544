"""Which X-rays a guard is fitted on: training images only, subsampled, and held out where a decoder trains.

Test images are never used: rows of a ``test`` split, and every file listed in the model's
``test_split.csv`` (the bundled model ships one), are left out. When a decoder has to be trained, a seeded
20% of the images is held out from it, so that the thresholds come from images the decoder never saw.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrcae.data import dataset_fingerprint, load_records
from cxrcae.data.records import Record
from cxrcae.errors import DataError
from cxrcae.ood.thresholds import MIN_SCORED

HOLDOUT = 0.2
"""Share of the images kept from decoder training to set the thresholds on."""
TEST_LIST = "test_split.csv"


def fit_records(
    data: str | Path, folder: Path, split: str | None, max_images: int | None, seed: int
) -> tuple[list[Record], dict[str, Any]]:
    """The images to fit on: ``split`` rows of a splits CSV (every row of a manifest or folder without a
    split column), never a test row nor a file of the model's ``test_split.csv``; subsampled, seeded."""

    records = load_records(data, labeled=False)
    splits = sorted({r.split for r in records if r.split is not None})
    excluded = 0
    if splits:
        if split is not None and split not in splits:
            raise DataError(f"{data}: no '{split}' rows (splits found: {', '.join(splits)})")
        keep = [r for r in records if r.split != "test" and (split is None or r.split == split)]
        excluded += sum(r.split == "test" for r in records)
        records = keep
    listed = _test_list(folder)
    if listed:
        keep = [r for r in records if not _listed(r.path, listed)]
        excluded += len(records) - len(keep)
        records = keep
    if not records:
        raise DataError(f"{data}: no images left to fit the OOD guard on (test images are never used)")
    chosen = subsample(records, max_images, seed)
    return chosen, {
        "source": str(data),
        "split": split if splits else None,
        "images": len(chosen),
        "available_images": len(records),
        "excluded_test_images": excluded,
        "fingerprint": dataset_fingerprint(chosen),
    }


def hold_out(paths: list[str], seed: int, data: Any) -> tuple[list[str], list[str]]:
    """(images to set the thresholds on, images to train the decoder on): a seeded 20 / 80 split."""
    order = np.random.default_rng(seed).permutation(len(paths))
    n_hold = max(MIN_SCORED, int(round(HOLDOUT * len(paths))))
    if len(paths) - n_hold < MIN_SCORED:
        raise DataError(
            f"{data}: {len(paths)} image(s) are too few to train the guard's decoder and hold some out for "
            f"its threshold; give at least {2 * MIN_SCORED}"
        )
    return [paths[i] for i in sorted(order[:n_hold])], [paths[i] for i in sorted(order[n_hold:])]


def subsample(records: Sequence[Record], max_images: int | None, seed: int) -> list[Record]:
    """At most ``max_images`` of ``records`` (all when None), a seeded choice, in path order."""
    ordered = sorted(records, key=lambda r: str(r.path))
    if max_images is None or len(ordered) <= int(max_images):
        return ordered
    keep = np.random.default_rng(seed).choice(len(ordered), int(max_images), replace=False)
    return [ordered[i] for i in sorted(keep)]


def _test_list(folder: Path) -> set[str]:
    """Paths (relative, forward slashes) in the model's ``test_split.csv``; empty when it has none."""
    path = folder / TEST_LIST
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        return {r["path"].replace("\\", "/").removeprefix("./") for r in rows if r.get("path")}


def _listed(path: Path, listed: set[str]) -> bool:
    """Whether ``path`` ends with one of the relative paths in ``listed`` (whole components only)."""
    parts = Path(path).parts
    return any("/".join(parts[-k:]) in listed for k in range(1, len(parts) + 1))
