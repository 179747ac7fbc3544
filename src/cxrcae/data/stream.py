"""Batched, streaming model input over arbitrary file paths, where a bad file is a row, not a crash.

``iter_batches`` is what predict, reconstruct, embed, evaluate and the OOD guard share: a ``DataLoader``
(workers decode in parallel, memory stays flat however many paths there are) over
``cxrcae.io.load_for_model``. A file that cannot be decoded does not stop the run: it comes back in the
batch's ``errors`` with its input index and a one-line reason (``cxrcae.data.dataset.failure_reason``, the
same words training uses when it skips a file: both go through ``SafeDataset`` and ``collate_with_errors``),
so callers can emit one output row per input, in input order.

Contract::

    for batch in iter_batches(paths, image_size=224, resize_mode="stretch", batch_size=32, num_workers=2):
        batch.images   # float32 tensor (n_ok, 3, S, S) in [0, 1]; n_ok may be 0 when every file failed
        batch.indices  # list[int]: position in ``paths`` of each image row
        batch.paths    # list[str]: the matching paths
        batch.errors   # list[(index, path, reason)] for the files of this batch that failed
        batch.facts    # with facts=True: cxrcae.io.facts.ImageFacts per image row (colour, DICOM header)

Batches arrive in input order and every index in ``range(len(paths))`` appears exactly once, either in
``indices`` or in ``errors``. Within a batch, merging ``indices`` and ``errors`` by index restores order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cxrcae.data.dataset import SafeDataset, Unreadable, collate_with_errors
from cxrcae.errors import CxrcaeError
from cxrcae.io import load_for_model
from cxrcae.io.facts import ImageFacts, load_with_facts


@dataclass
class Batch:
    """Decoded images of one batch plus the files of that batch that failed."""

    images: torch.Tensor
    indices: list[int]
    paths: list[str]
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    facts: list[ImageFacts] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices) + len(self.errors)


class PathDataset(Dataset):
    """Items ``{"image": (3,S,S) float32, "path": str}`` for the files of ``paths``, in order; with
    ``facts``, also ``"facts"``: what the out-of-distribution screen needs, from the same single decode.

    Decoding errors are not caught here: ``iter_batches`` wraps it in ``SafeDataset`` (the wrapper training
    uses too), which turns them into error rows in the worker.
    """

    def __init__(
        self, paths: Sequence[str | Path], image_size: int, resize_mode: str = "stretch", facts: bool = False
    ):
        self.paths = [str(p) for p in paths]
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.facts = facts

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        """The path of item ``index`` exactly as given (``SafeDataset`` names failed items with it)."""
        return self.paths[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        if self.facts:
            image, facts = load_with_facts(path, self.image_size, self.resize_mode)
            return {"image": torch.from_numpy(image), "path": path, "facts": facts}
        return {
            "image": torch.from_numpy(load_for_model(path, self.image_size, mode=self.resize_mode)),
            "path": path,
        }


def iter_batches(
    paths: Sequence[str | Path],
    image_size: int,
    resize_mode: str = "stretch",
    batch_size: int = 32,
    num_workers: int = 0,
    pin_memory: bool = False,
    facts: bool = False,
) -> Iterator[Batch]:
    """Yield ``Batch`` objects over ``paths`` in order (see the module docstring for the contract)."""
    if batch_size < 1:
        raise CxrcaeError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise CxrcaeError(f"number of workers must be >= 0, got {num_workers}")
    dataset = PathDataset(paths, image_size, resize_mode, facts)
    if len(dataset) == 0:
        return
    loader = DataLoader(
        SafeDataset(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(num_workers, max(1, -(-len(dataset) // batch_size))) if num_workers else 0,
        collate_fn=partial(_collate, image_size=int(image_size)),
        pin_memory=pin_memory,
    )
    for batch in loader:
        yield Batch(batch["image"], batch["index"], batch["path"], batch["errors"], batch["facts"])


def _collate(items: list[dict[str, Any] | Unreadable], image_size: int) -> dict:
    """``collate_with_errors`` plus the ``facts`` of the readable items (empty when not asked for)."""
    batch = collate_with_errors(items, image_size)
    batch["facts"] = [it["facts"] for it in items if not isinstance(it, Unreadable) and "facts" in it]
    return batch
