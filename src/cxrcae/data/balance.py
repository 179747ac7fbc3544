"""Weights that balance a training set: per class in the loss, or per image in the sampler.

Torch tensors, so this module is imported where training happens, never by ``cxrcae.data`` itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from cxrcae.errors import DataError


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """n / (k * n_c): every class contributes equally to the loss (sklearn's 'balanced')."""
    counts = torch.bincount(torch.tensor([lab for lab in labels if lab >= 0]), minlength=n_classes).double()
    if (counts == 0).any():
        empty = int((counts == 0).nonzero()[0])
        raise DataError(f"class index {empty} has no training images; cannot balance")
    return (counts.sum() / (n_classes * counts)).float()


def source_balanced_weights(labels: Sequence[int], sources: Sequence[str | None]) -> torch.Tensor:
    """Per-image sampling weights for ``--balance source``: every class gets the same total weight, and
    inside a class each source gets a share proportional to the square root of its image count.

    Why: in public COVID sets each class comes mostly from one source (radiography-db pneumonia is largely
    pediatric), so a model can learn the source instead of the disease. Giving the minority sources of a
    class more weight weakens that shortcut; the square root keeps a source of two images from being
    repeated hundreds of times per epoch (full source equality would).
    """
    cells = Counter((lab, src or "") for lab, src in zip(labels, sources) if lab >= 0)
    if not cells:
        raise DataError("no labelled training images to balance")
    classes = sorted({lab for lab, _ in cells})
    root_sum = {c: sum(n**0.5 for (lab, _), n in cells.items() if lab == c) for c in classes}
    weights = []
    for lab, src in zip(labels, sources):
        if lab < 0:
            weights.append(0.0)
            continue
        n = cells[(lab, src or "")]
        # class mass 1/k, split over sources by sqrt(n), then evenly over the n images of the cell
        weights.append((n**0.5 / root_sum[lab]) / (len(classes) * n))
    return torch.tensor(weights, dtype=torch.double)
