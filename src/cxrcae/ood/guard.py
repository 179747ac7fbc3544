"""The out-of-distribution guard stored beside a classifier: its own autoencoder and two thresholds.

A fine-tuned classifier's encoder has been changed by fine-tuning, so the guard keeps its own convolutional
autoencoder (the pretraining run's encoder + decoder, or a decoder trained on a frozen pretrained encoder) in
``ood.safetensors`` (float16: half the size, scores unchanged to ~1e-3) beside ``model.safetensors``. Its
settings live in the ``ood`` block of ``config.json``::

    "ood": {"file": "ood.safetensors", "weights_sha256": ..., "score": "...", "threshold": 0.0145,
            "relative_threshold": 0.27, "quantile": 0.995, "n_images": 1000, "image_size": 96,
            "resize_mode": "stretch", "distribution": {...}, "autoencoder": {...}, "data": {...}}

An image gets two scores: the mean squared error of the guard's reconstruction of the model input (the
pretraining loss), and that error relative to the image's own contrast (MSE / (pixel variance + 0.001)).
The first catches busy images the autoencoder cannot draw (photographs); the second catches faint ones
whose small absolute error is still most of their contrast (a page of text, a washed-out scan). Each
threshold is the ``quantile`` of its score over ``n_images`` training X-rays. The classifier's own weights
are untouched, so its ``weights_sha256`` stays valid; the guard file has its own hash in the block.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from cxrcae import __version__
from cxrcae._atomic import atomic_write_bytes, atomic_write_text
from cxrcae.errors import CheckpointError
from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.models.checkpoint import (
    CONFIG_NAME,
    GUARD_BLOCK,
    GUARD_NAME,
    load_state_strict,
    read_config,
    read_guard,
)

SCORE = (
    "mse: mean squared error between the model input (3 x S x S in [0, 1], the classifier's preprocessing) "
    "and the guard autoencoder's reconstruction of it; relative: mse / (variance of the input's pixels + "
    "0.001)"
)
CONTRAST_FLOOR = 1e-3  # keeps the relative score finite on a constant image (flagged as blank anyway)


def reconstruction_scores(cae: ConvAutoencoder, images: torch.Tensor) -> torch.Tensor:
    """Per-image scores, float32 (B, 2): [MSE of the reconstruction (the pretraining loss), MSE relative
    to the image's pixel variance]."""
    x = images.float()
    mse = (cae(images).float() - x).pow(2).flatten(1).mean(1)
    variance = x[:, 0].flatten(1).var(1, unbiased=False)
    return torch.stack([mse, mse / (variance + CONTRAST_FLOOR)], dim=1)


@dataclass
class Guard:
    """A loaded guard: ``cae`` in eval mode, ``block`` its config.json settings."""

    cae: ConvAutoencoder
    block: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.block["threshold"])

    @property
    def relative_threshold(self) -> float | None:
        value = self.block.get("relative_threshold")
        return None if value is None else float(value)

    @torch.inference_mode()
    def scores(self, images: torch.Tensor) -> np.ndarray:
        """``reconstruction_scores`` of a batch, (B, 2), on the guard's device (float32 weights there)."""
        device = next(self.cae.parameters()).device
        return reconstruction_scores(self.cae, images.to(device)).cpu().numpy()

    def ratios(self, images: torch.Tensor) -> np.ndarray:
        """Each score over its threshold, (B, 2); > 1 is out of distribution (NaN where no threshold)."""
        scores = self.scores(images)
        relative = self.relative_threshold
        return np.stack(
            [scores[:, 0] / self.threshold, scores[:, 1] / relative if relative else np.nan * scores[:, 1]],
            axis=1,
        )


def save_guard(folder: str | Path, cae: ConvAutoencoder, block: dict[str, Any]) -> dict[str, Any]:
    """Write ``ood.safetensors`` (float16) and the ``ood`` block into a checkpoint folder's config.json.

    The guard file is written first and config.json last (both atomically), so a reader never finds a
    block that points at a missing or different file. Returns the block as stored.
    """
    out = Path(folder)
    config = read_config(out)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in cae.state_dict().items()}
    blob = save(state, metadata={"format": "pt", "cxrcae": __version__, "kind": "ood_guard"})
    stored = {
        "file": GUARD_NAME,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "weights_dtype": "float16",
        "score": SCORE,
        **block,
    }
    atomic_write_bytes(out / GUARD_NAME, blob)
    config[GUARD_BLOCK] = stored
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return stored


def guard_block(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``ood`` block of a config, checked for the fields prediction needs; None when absent."""
    block = config.get(GUARD_BLOCK)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise CheckpointError(f"config.json '{GUARD_BLOCK}' must be an object, got {type(block).__name__}")
    for key in ("threshold", "image_size", "resize_mode"):
        if key not in block:
            raise CheckpointError(f"config.json '{GUARD_BLOCK}' block has no '{key}'")
    for key in ("threshold", "relative_threshold"):
        value = block.get(key, 1.0)
        if not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise CheckpointError(
                f"config.json '{GUARD_BLOCK}' {key} must be a positive number, got {value!r}"
            )
    return block


def load_guard(
    folder: str | Path, config: dict[str, Any], device: str | torch.device = "cpu"
) -> Guard | None:
    """The guard of a checkpoint folder, or None when its config has no ``ood`` block.

    Raises ``CheckpointError`` when the block names a file that is missing, altered or does not fit
    (``cxrcae.models.checkpoint.read_guard``).
    """
    block = guard_block(config)
    state = read_guard(folder, config)
    if block is None or state is None:
        return None
    in_chans = int(config.get("in_chans", 3))
    cae = ConvAutoencoder(CAEEncoder(in_chans), CAEDecoder(in_chans))
    where = str(Path(folder) / str(block.get("file", GUARD_NAME)))
    load_state_strict(cae, {k: v.float() for k, v in state.items()}, where)
    return Guard(cae.to(device).eval(), block)


def has_guard(folder: str | Path, config: dict[str, Any]) -> bool:
    """Whether a checkpoint folder carries a guard file for its ``ood`` block (for the CLI's notes)."""
    block = config.get(GUARD_BLOCK)
    return isinstance(block, dict) and (Path(folder) / str(block.get("file", GUARD_NAME))).is_file()
