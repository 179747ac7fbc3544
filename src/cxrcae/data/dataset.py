"""The torch ``Dataset`` over records, and the one way a bad file becomes a row instead of a crash.

Every image goes through ``cxrcae.io.load_for_model``. ``SafeDataset`` wraps a dataset (``XrayDataset`` for
training, the path list of ``cxrcae.data.stream.iter_batches`` for inference) so that an item that cannot
be read comes back as an ``Unreadable`` marker (index, path, one-line reason from ``failure_reason``);
``collate_with_errors`` stacks the readable images of a batch and lists the unreadable ones. Training and
inference share both, so a file is unreadable for the same reason, in the same words, everywhere.

This module and ``stream`` are the only ones of ``cxrcae.data`` that import torch (and the package loads
neither until asked), so reading and splitting manifests stays light enough for the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from cxrcae.data.records import Record
from cxrcae.data.records import class_names as _class_names
from cxrcae.errors import CxrcaeError, DataError, ImageLoadError
from cxrcae.io import load_for_model
from cxrcae.io.decoded import DecodedCache


class XrayDataset(Dataset):
    """Items ``{"image": (3,S,S) float32 in [0,1], "label": int, "path": str, "patient_id": str}``.

    ``label`` indexes ``class_names`` (sorted labels of ``records`` unless given, e.g. from a checkpoint);
    it is -1 for unlabeled images and for labels outside ``class_names``. With ``targets`` (one per record,
    e.g. a task's 0/1 vector or masks) ``label`` is the record's target instead. ``transform`` (augmentation)
    receives and returns the image tensor. With ``decoded`` (a ``DecodedCache``) each file is decoded once and
    read back from the cache afterwards; augmentation still runs on every access.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        resize_mode: str = "stretch",
        class_names: Sequence[str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        decoded: DecodedCache | None = None,
        targets: Sequence[Any] | None = None,
    ):
        if image_size < 1:
            raise DataError(f"image size must be a positive number of pixels, got {image_size}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.class_names = list(class_names) if class_names is not None else _class_names(self.records)
        self.transform = transform
        self.decoded = decoded
        index = {name: i for i, name in enumerate(self.class_names)}
        self._labels = [index.get(r.label, -1) if r.label is not None else -1 for r in self.records]
        if targets is not None and len(targets) != len(self.records):
            raise DataError(f"{len(targets)} targets for {len(self.records)} images")
        self._targets = None if targets is None else list(targets)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def targets(self) -> list[Any] | None:
        """The per-record targets given at construction (None: class indices from ``class_names``)."""
        return None if self._targets is None else list(self._targets)

    @property
    def labels(self) -> list[int]:
        """Integer label per item (-1 unlabeled), for weighted samplers and class counts without decoding."""
        return list(self._labels)

    def path(self, index: int) -> str:
        """The file of item ``index``, as its item's ``"path"`` names it (no decoding)."""
        return str(self.records[index].path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if self.decoded is not None:
            array = self.decoded.load(record.path, self.image_size, self.resize_mode)
        else:
            array = load_for_model(record.path, self.image_size, mode=self.resize_mode)
        image = torch.from_numpy(array)
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "label": self._labels[index] if self._targets is None else self._targets[index],
            "path": self.path(index),
            "patient_id": record.patient_id or "",
        }

    def __repr__(self) -> str:
        return (
            f"XrayDataset({len(self)} images, size={self.image_size}, resize_mode={self.resize_mode!r}, "
            f"classes={self.class_names})"
        )


# ----------------------------------------------------------------------------------------------- bad files


def failure_reason(exc: BaseException) -> str:
    """One line saying why a file could not be used (no path: the row already names it)."""
    if isinstance(exc, ImageLoadError):
        return exc.reason
    if isinstance(exc, CxrcaeError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    return f"unexpected {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Unreadable:
    """What ``SafeDataset`` returns in place of an item whose file could not be read."""

    index: int
    path: str
    reason: str


class SafeDataset(Dataset):
    """Wraps a dataset of dict items (``"image"``, ``"path"``, optionally ``"label"``) so that an item that
    raises becomes an ``Unreadable`` marker instead of killing the epoch or the run.

    Readable items come back as the wrapped dataset's dict plus ``"index"``. The marker's path comes from the
    wrapped dataset's ``path(index)`` (``XrayDataset`` has one), else from the ``ImageLoadError``.

    ``catch`` is what counts as a bad file: training catches only ``ImageLoadError`` (what the decoders raise
    for a broken file), so a bug in, say, an augmentation still fails loudly; inference over arbitrary
    user files catches any ``Exception`` so that one odd file never stops a batch job.
    """

    def __init__(self, dataset: Dataset, catch: tuple[type[BaseException], ...] = (Exception,)):
        self.dataset = dataset
        self.catch = catch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | Unreadable:
        try:
            item = self.dataset[index]
        except self.catch as exc:  # a bad file becomes a marker; the run goes on
            return Unreadable(index, self._path(index, exc), failure_reason(exc))
        return {**item, "index": index}

    def _path(self, index: int, exc: BaseException) -> str:
        path_of = getattr(self.dataset, "path", None)
        if callable(path_of):
            return str(path_of(index))
        return str(getattr(exc, "path", ""))


def collate_with_errors(items: list[dict[str, Any] | Unreadable], image_size: int | None = None) -> dict:
    """One batch from ``SafeDataset`` items: the readable ones stacked, the unreadable ones listed.

    Keys: ``"image"`` (n_ok, 3, S, S) float32, ``"label"`` (n_ok,) long (-1 where an item has none),
    ``"index"`` and ``"path"`` of each image row, ``"errors"`` ``[(index, path, reason)]`` and ``"skipped"``
    ``["path: reason"]`` for the unreadable items. When nothing was readable ``"image"`` is empty, shaped
    (0, 3, S, S) when ``image_size`` is given (bind it with ``functools.partial``; that stays picklable for
    spawned workers), else (0,).
    """
    good = [it for it in items if not isinstance(it, Unreadable)]
    bad = [it for it in items if isinstance(it, Unreadable)]
    if good:
        image = torch.stack([it["image"] for it in good])
    elif image_size is not None:
        image = torch.empty((0, 3, int(image_size), int(image_size)), dtype=torch.float32)
    else:
        image = torch.empty(0)
    return {
        "image": image,
        "label": _stack_targets([it.get("label", -1) for it in good]),
        "index": [it["index"] for it in good],
        "path": [it["path"] for it in good],
        "errors": [(it.index, it.path, it.reason) for it in bad],
        "skipped": [f"{it.path}: {it.reason}" for it in bad],
    }


def _stack_targets(targets: list[Any]) -> torch.Tensor:
    """Class indices as a long vector (-1 where none); tensor targets (0/1 vectors, masks) stacked."""
    if targets and isinstance(targets[0], torch.Tensor):
        return torch.stack(targets)
    return torch.tensor(targets, dtype=torch.long)
