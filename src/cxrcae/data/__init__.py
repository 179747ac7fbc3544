"""Datasets and splits: records from folders or manifests, leak-free splits, and the torch Dataset.

``XrayDataset`` is imported lazily (on first use of ``cxrcae.data.XrayDataset``) so that reading or splitting
a manifest never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cxrcae.data.records import (
    SPLITS,
    UNLABELED,
    Record,
    class_names,
    dataset_fingerprint,
    load_records,
    write_records,
)
from cxrcae.data.splits import (
    DEFAULT_RATIOS,
    SplitResult,
    label_fraction,
    make_splits,
    split_records,
    split_summary,
)

__all__ = [
    "SPLITS",
    "UNLABELED",
    "Record",
    "XrayDataset",
    "DEFAULT_RATIOS",
    "SplitResult",
    "class_names",
    "dataset_fingerprint",
    "label_fraction",
    "load_records",
    "make_splits",
    "split_records",
    "split_summary",
    "write_records",
]

if TYPE_CHECKING:  # pragma: no cover
    from cxrcae.data.dataset import XrayDataset


def __getattr__(name: str) -> Any:
    """``XrayDataset`` on first use: importing it loads torch (the one lazy import outside ``cxrcae.cli``
    and ``cxrcae/__init__``, allowed by ``tools/check_imports.py``)."""
    if name == "XrayDataset":
        from cxrcae.data.dataset import XrayDataset

        globals()[name] = XrayDataset
        return XrayDataset
    raise AttributeError(f"module 'cxrcae.data' has no attribute {name!r}")
