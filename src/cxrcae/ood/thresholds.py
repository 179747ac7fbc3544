"""The guard's thresholds: score in-distribution X-rays with the guard autoencoder, take a quantile of each.

The threshold is the ``quantile`` (default 99.5%) of the reconstruction errors of training X-rays under the
classifier's preprocessing, so about 0.5% of images like the training ones are flagged by construction. The
scores are computed with the weights rounded to float16 as ``ood.safetensors`` stores them (``as_stored``),
so the thresholds are set on exactly the scores prediction will compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cxrcae.data.stream import iter_batches
from cxrcae.models.cae import ConvAutoencoder
from cxrcae.ood.guard import reconstruction_scores
from cxrcae.progress import ProgressFn, no_progress

DEFAULT_QUANTILE = 0.995
MIN_SCORED = 20
"""Fewer in-distribution scores than this give no usable 99.5% quantile: the fit is refused."""


def as_stored(cae: ConvAutoencoder) -> ConvAutoencoder:
    """The autoencoder with its weights rounded to float16 as ``ood.safetensors`` stores them, so that the
    thresholds are set on exactly the scores prediction will compute."""
    return cae.to(torch.float16).to(torch.float32)


def score_paths(
    cae: ConvAutoencoder,
    paths: Sequence[str],
    size: int,
    mode: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: ProgressFn = no_progress,
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """``reconstruction_scores`` (n_ok, 2) of the readable ``paths`` (float32 weights) and the unreadable."""
    cae = cae.float().to(device).eval()
    scores, errors, done = [], [], 0
    for batch in iter_batches(paths, size, mode, batch_size=batch_size, num_workers=num_workers):
        errors += batch.errors
        if batch.indices:
            with torch.inference_mode():
                scores.append(reconstruction_scores(cae, batch.images.to(device)).cpu().numpy())
        done += len(batch)
        progress("guard: scoring", done, len(paths))
    return (np.concatenate(scores) if scores else np.zeros((0, 2), np.float32)), errors


def threshold_block(scores: np.ndarray, quantile: float, size: int, mode: str) -> dict[str, Any]:
    """The ``ood`` config fields that in-distribution scores (n, 2) give: both thresholds and a summary."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, 2)
    thresholds = np.quantile(scores, quantile, axis=0)
    flagged = (scores > thresholds).any(axis=1)

    def summary(values: np.ndarray) -> dict[str, float]:
        return {
            "mean": float(values.mean()),
            **{f"p{q}": float(np.quantile(values, q / 100)) for q in (50, 90, 99)},
            "max": float(values.max()),
        }

    return {
        "threshold": float(thresholds[0]),
        "relative_threshold": float(thresholds[1]),
        "quantile": float(quantile),
        "n_images": int(len(scores)),
        "image_size": int(size),
        "resize_mode": str(mode),
        "distribution": {
            "mse": summary(scores[:, 0]),
            "relative": summary(scores[:, 1]),
            "flagged_fraction": float(flagged.mean()),
        },
    }
