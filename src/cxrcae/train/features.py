"""Frozen-encoder stages on cached features: the encoder runs once, the head trains for many epochs.

In a fine-tuning stage that trains no encoder parameter (stage ``head``), and without augmentation, the
encoder computes the same features for an image in every epoch: its weights are frozen, it is in eval mode
and its input never changes. ``fit`` then runs it once over the train and val images (``encode``: eval mode,
the run's autocast and memory format, the loaders' batch size) and runs the stage's epochs on those features:

- ``CachedFeatures`` stands in for the image dataset index for index, so a loader built the same way and
  reseeded the same way gives the same batches in the same order (shuffled or weighted-sampled alike);
- ``HeadOnly`` applies only the classifier's head, so the loss, the gradients and the optimiser steps are
  those of the full classifier whose encoder output would have been the same features.

Validation metrics, history rows, early stopping, checkpoints (written from the full classifier) and resume
behave as on the image path; the numbers agree to floating-point rounding (the encoder sees other batch
compositions). An unreadable file stays unreadable: ``CachedFeatures`` raises the same ``ImageLoadError``
for it, so every epoch lists it under ``"skipped"`` as before.

Memory: the features live on the CPU, 512 x (S/32)^2 values per image in the encoder's output dtype: 100 KB
at 224 px in fp32 (about 1 GB per 10,000 images), half that under bf16 autocast.

Not used with augmentation (each epoch sees other pixels), in stages that train encoder blocks, or with
``limit_batches`` (a smoke run reads a few batches an epoch; encoding every image would cost more).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrcae.errors import ImageLoadError
from cxrcae.models import CXRClassifier
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast
from cxrcae.train.config import TrainConfig


class Placement(Protocol):
    """What ``encode`` needs of the run's ``cxrcae.train.engine.Runtime``."""

    device: torch.device
    dtype: torch.dtype | None

    def images(self, batch: dict[str, Any]) -> torch.Tensor: ...


def use_cached_features(model: nn.Module, cfg: TrainConfig) -> bool:
    """True when a stage, as ``set_stage`` left ``model``, can run on cached features: a classifier with
    no trainable encoder parameter, no augmentation, no ``limit_batches``."""
    if not isinstance(model, CXRClassifier) or cfg.augment or cfg.limit_batches is not None:
        return False
    return not any(p.requires_grad for p in model.encoder.parameters())


class HeadOnly(nn.Module):
    """The classifier's ``forward_head`` as a module: what a stage on cached features trains and validates.

    It holds the whole classifier, so ``train_mode`` still finds the frozen encoder (and keeps it in eval
    mode) and the head's dropout behaves as in ``CXRClassifier.forward``.
    """

    def __init__(self, model: CXRClassifier):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features)


class CachedFeatures(Dataset):
    """The items of an image dataset with each image replaced by its encoder features, index for index.

    Items are ``{"image": features, "label": int, "path": str}`` (the key stays ``"image"`` so the training
    loop reads them unchanged); an index whose file could not be read raises the ``ImageLoadError`` it
    raised when encoding, which ``SafeDataset`` turns into the same ``"skipped"`` entry.
    """

    def __init__(
        self,
        features: list[torch.Tensor | None],
        labels: list[int],
        paths: list[str],
        errors: dict[int, str],
    ):
        self.features, self.labels, self.paths, self.errors = features, labels, paths, errors

    def __len__(self) -> int:
        return len(self.features)

    def path(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        features = self.features[index]
        if features is None:
            raise ImageLoadError(self.paths[index], self.errors[index])
        return {"image": features, "label": self.labels[index], "path": self.paths[index]}

    def nbytes(self) -> int:
        return sum(f.nelement() * f.element_size() for f in self.features if f is not None)


@torch.no_grad()
def encode(
    model: CXRClassifier,
    loader: DataLoader,
    rt: Placement,
    *,
    progress: ProgressFn = no_progress,
    task: str = "encode",
    offset: int = 0,
    total: int | None = None,
) -> CachedFeatures:
    """The encoder's features of every image ``loader`` yields (a ``make_loader`` over the image dataset,
    unshuffled), kept on the CPU; unreadable files are remembered with their reason."""
    n = len(loader.dataset)  # type: ignore[arg-type]
    features: list[torch.Tensor | None] = [None] * n
    labels, paths, errors = [-1] * n, [""] * n, {}
    was_training = model.encoder.training
    model.encoder.eval()
    try:
        for step, batch in enumerate(loader, start=1):
            for index, path, reason in batch["errors"]:
                paths[index], errors[index] = path, reason
            if len(batch["image"]):
                with autocast(rt.device, rt.dtype):
                    out = model.forward_features(rt.images(batch))
                out = out.to("cpu").contiguous()
                rows = zip(batch["index"], batch["path"], batch["label"].tolist())
                for row, (index, path, label) in enumerate(rows):
                    features[index], paths[index], labels[index] = out[row], path, label
            progress(task, offset + step, total, "encoding images once (frozen encoder)")
    finally:
        model.encoder.train(was_training)
    return CachedFeatures(features, labels, paths, errors)
