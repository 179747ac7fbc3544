"""Segmentation figures on 0/1 masks: Dice, IoU, 95% Hausdorff distance, their bootstrap CIs, and the
cardiothoracic ratio. Pure numpy / scipy; masks are compared at the model's input size.

Empty masks, defined so that every image counts in every mean:

- both masks empty (the structure is absent and none was predicted): Dice 1, IoU 1, HD95 0;
- one empty, the other not (missed or hallucinated): Dice 0, IoU 0, HD95 = the image diagonal in pixels,
  the largest distance two pixels of the image can have, i.e. the worst score HD95 can take.

HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: the border pixels of each mask (mask
pixels with a 4-neighbour outside it), the Euclidean distance of each border pixel of one mask to the nearest
border pixel of the other (``scipy.ndimage.distance_transform_edt``), the 95th percentile in each direction,
and the larger of the two. Units: pixels at the model's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from cxrcae.metrics import resample_weights

FIGURES = ("dice", "iou", "hd95")
LEVEL = 0.95


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2 |P & R| / (|P| + |R|); 1 when both are empty."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P & R| / |P | R| (Jaccard); 1 when both are empty."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    union = int((pred | ref).sum())
    return 1.0 if union == 0 else int((pred & ref).sum()) / union


def _border(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, ref: np.ndarray) -> float:
    """95% Hausdorff distance in pixels (module docstring: definition and empty masks)."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return float(np.hypot(*pred.shape))
    bp, br = _border(pred), _border(ref)
    to_ref = ndimage.distance_transform_edt(~br)[bp]  # each border pixel of P to the nearest of R
    to_pred = ndimage.distance_transform_edt(~bp)[br]
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def per_image(masks: np.ndarray, refs: np.ndarray) -> dict[str, np.ndarray]:
    """(N, K) arrays of Dice, IoU and HD95 of predicted ``masks`` against ``refs``, both (N, K, H, W)."""
    masks, refs = np.asarray(masks).astype(bool), np.asarray(refs).astype(bool)
    if masks.shape != refs.shape or masks.ndim != 4:
        raise ValueError(f"masks {masks.shape} and references {refs.shape} must both be (N, K, H, W)")
    n, k = masks.shape[:2]
    out = {name: np.zeros((n, k)) for name in FIGURES}
    for i in range(n):
        for j in range(k):
            out["dice"][i, j] = dice(masks[i, j], refs[i, j])
            out["iou"][i, j] = iou(masks[i, j], refs[i, j])
            out["hd95"][i, j] = hd95(masks[i, j], refs[i, j])
    return out


def _ci(samples: np.ndarray) -> list[float]:
    alpha = (1.0 - LEVEL) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def summarise(
    values: dict[str, np.ndarray],
    structures: Sequence[str],
    groups: Sequence[str | None] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Means per structure and over structures, with percentile-bootstrap 95% CIs over ``groups`` (patients:
    one patient's images are drawn together; an image without a patient id is its own unit).

    ``{structure: {"dice", "iou", "hd95", "ci": {figure: [lo, hi]}}, "mean": {same, over structures},
    "bootstrap": {...}}``; ``ci`` is absent when ``n_boot`` is 0."""
    n = values["dice"].shape[0]
    has_groups = groups is not None and any(g not in (None, "") for g in groups)
    weights = resample_weights(n, n_boot, seed, groups if has_groups else None) if n_boot > 0 else None

    def block(columns: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {name: float(col.mean()) for name, col in columns.items()}
        if weights is not None:
            out["ci"] = {name: _ci(weights @ col / weights.sum(axis=1)) for name, col in columns.items()}
        return out

    report: dict[str, Any] = {
        name: block({f: values[f][:, j] for f in FIGURES}) for j, name in enumerate(structures)
    }
    report["mean"] = block({f: values[f].mean(axis=1) for f in FIGURES})
    units = len({g for g in groups if g}) + sum(1 for g in groups if not g) if has_groups else n
    report["bootstrap"] = {
        "n_resamples": int(n_boot),
        "unit": "patient" if has_groups else "image",
        "n_units": int(units),
        "level": LEVEL,
        "seed": int(seed),
    }
    return report


# ----------------------------------------------------------------------------------------------- CTR


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def horizontal_extent(mask: np.ndarray) -> tuple[int, int] | None:
    """(first, last) column holding a mask pixel, or None for an empty mask."""
    columns = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=0))
    return (int(columns[0]), int(columns[-1])) if columns.size else None


def cardiothoracic_ratio(
    heart: np.ndarray, left_lung: np.ndarray, right_lung: np.ndarray, *, largest_component: bool = True
) -> float | None:
    """Maximal horizontal heart width over maximal horizontal thoracic width, from masks.

    Heart width: the columns from the heart's leftmost to its rightmost pixel (the clinical MRD + MLD, the
    greatest distances of the heart border right and left of the midline, add up to it). Thoracic width:
    the same over the union of both lungs (outer edge of one lung to the outer edge of the other). With
    ``largest_component`` each mask is first reduced to its largest connected region, so a stray predicted
    speck does not widen a structure. None when the heart or both lungs are empty. Widths in pixels, so
    the ratio is the same at any image size (and under stretching, which scales both widths alike).
    """
    masks = [np.asarray(m, dtype=bool) for m in (heart, left_lung, right_lung)]
    if largest_component:
        masks = [_largest_component(m) for m in masks]
    heart_span = horizontal_extent(masks[0])
    chest_span = horizontal_extent(masks[1] | masks[2])
    if heart_span is None or chest_span is None:
        return None
    return (heart_span[1] - heart_span[0] + 1) / (chest_span[1] - chest_span[0] + 1)
