"""The torch ``Dataset`` over records: every image goes through ``cxrcae.io.load_for_model``.

This is the only module of ``cxrcae.data`` that imports torch, so reading and splitting manifests stays
light enough for the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cxrcae.data.records import Record
from cxrcae.data.records import class_names as _class_names
from cxrcae.errors import DataError
from cxrcae.io import load_for_model


class XrayDataset(Dataset):
    """Items ``{"image": (3,S,S) float32 in [0,1], "label": int, "path": str, "patient_id": str}``.

    ``label`` indexes ``class_names`` (sorted labels of ``records`` unless given, e.g. from a checkpoint);
    it is -1 for unlabeled images and for labels outside ``class_names``. ``transform`` (augmentation)
    receives and returns the image tensor.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        resize_mode: str = "stretch",
        class_names: Sequence[str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if image_size < 1:
            raise DataError(f"image size must be a positive number of pixels, got {image_size}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.class_names = list(class_names) if class_names is not None else _class_names(self.records)
        self.transform = transform
        index = {name: i for i, name in enumerate(self.class_names)}
        self._labels = [index.get(r.label, -1) if r.label is not None else -1 for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        """Integer label per item (-1 unlabeled), for weighted samplers and class counts without decoding."""
        return list(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:

        record = self.records[index]
        image = torch.from_numpy(load_for_model(record.path, self.image_size, mode=self.resize_mode))
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "label": self._labels[index],
            "path": str(record.path),
            "patient_id": record.patient_id or "",
        }

    def __repr__(self) -> str:
        return (
            f"XrayDataset({len(self)} images, size={self.image_size}, resize_mode={self.resize_mode!r}, "
            f"classes={self.class_names})"
        )
