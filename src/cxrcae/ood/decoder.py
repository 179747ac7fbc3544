"""What training a guard's decoder on a frozen encoder needs: the data, the loss and the recipe.

The training itself is the engine's (``cxrcae.train.guard.train_decoder`` runs ``cxrcae.train.engine.fit``
on these pieces). The encoder is frozen, so it runs once per image (``encode_images``: float16 features
kept in memory with the gray target); every epoch then costs only the decoder. The loss is pretraining's
(``DecoderReconstruction``: MSE between the decoder's output and the image); a seeded tenth of the images
(``VAL_SHARE``) is kept from the updates to choose the best epoch and stop early.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cxrcae.data.stream import iter_batches
from cxrcae.errors import DataError
from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.tasks import Objective

DEFAULT_EPOCHS = 5
LR = 1e-3
PATIENCE = 2
"""Epochs without a better validation MSE before the decoder's training stops (the best epoch is kept)."""
VAL_SHARE = 0.1


class DecoderReconstruction(Objective):
    """Pretraining's loss for a decoder over encoder features: MSE between ``decoder(features)`` and the
    image's gray target, spread over the decoder's output channels (fp32, as every objective's)."""

    name = "mse"

    def __call__(self, model: nn.Module, features: torch.Tensor, targets: torch.Tensor):
        out = model(features.float())
        return F.mse_loss(out.float(), targets.float().expand_as(out)), out


class EncodedImages(Dataset):
    """Items ``{"image": encoder features, "label": gray image (1, S, S), "path"}``, float16 on the CPU:
    what the engine feeds ``DecoderReconstruction`` (the image key holds the decoder's input)."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, paths: Sequence[str]):
        self.features, self.targets, self.paths = features, targets, list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.features[index], "label": self.targets[index], "path": self.paths[index]}


def validation_split(paths: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """(images the decoder trains on, images that choose its best epoch): a seeded 90 / 10 split."""
    if len(paths) < 2:
        raise DataError(f"{len(paths)} image(s) are too few to train the guard's decoder")
    order = np.random.default_rng(seed).permutation(len(paths))
    n_val = min(len(paths) - 1, max(1, int(round(VAL_SHARE * len(paths)))))
    return [paths[i] for i in sorted(order[n_val:])], [paths[i] for i in sorted(order[:n_val])]


@torch.no_grad()
def encode_images(
    encoder: CAEEncoder,
    paths: Sequence[str],
    size: int,
    mode: str,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: ProgressFn = no_progress,
) -> EncodedImages:
    """The frozen ``encoder``'s features of the readable ``paths`` (unreadable ones left out), with their
    gray targets, both float16 on the CPU."""
    encoder.to(device).eval().requires_grad_(False)
    feats, targets, kept, done = [], [], [], 0
    for batch in iter_batches(paths, size, mode, batch_size=batch_size, num_workers=num_workers):
        if batch.indices:
            feats.append(encoder(batch.images.to(device)).to("cpu", torch.float16))
            targets.append(batch.images[:, :1].to(torch.float16))
            kept += batch.paths
        done += len(batch)
        progress("guard: encoding", done, len(paths))
    if not feats:
        raise DataError("none of the images to train the guard's decoder on could be read")
    return EncodedImages(torch.cat(feats), torch.cat(targets), kept)


def fresh_decoder(cae: ConvAutoencoder) -> CAEDecoder:
    """A newly initialised decoder for ``cae`` (its number of output channels)."""
    return CAEDecoder(cae.decoder.stages[-1].out_channels)
