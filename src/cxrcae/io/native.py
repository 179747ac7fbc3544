"""Decoded pixels at their stored precision, before any intensity mapping: what pixel_hash fingerprints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ITU-R BT.601 luma, the weights PIL's convert("L") uses, applied in float so 16-bit stays exact.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class NativeImage:
    """``pixels`` is HxW, or HxWx3 for genuine colour; ``alpha`` is None when absent or fully opaque.

    ``white`` is the nominal full-scale value (255, 65535, 1.0) that maps to 1.0, or None when the
    file carries no such scale and the pixels are min-max normalised instead.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    white: float | None

    def to_unit(self) -> np.ndarray:
        """Float32 HxW in [0, 1]: luminance, then full-scale (or min-max) scaling, then alpha over black."""
        arr = self.pixels.astype(np.float32, copy=False)
        if arr.ndim == 3:
            arr = arr @ LUMA
        if self.white is not None:
            arr = arr / np.float32(self.white)
        else:
            arr = minmax(arr)
        if self.alpha is not None:
            amax = 65535.0 if self.alpha.dtype == np.uint16 else 255.0
            arr = arr * (self.alpha.astype(np.float32) / np.float32(amax))
        return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


def minmax(arr: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1]; a constant image becomes all zeros rather than NaN."""
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - np.float32(lo)) / np.float32(hi - lo)


def collapse_gray(rgb: np.ndarray) -> np.ndarray:
    """An RGB image whose three channels are equal is a grayscale image saved as colour: keep one channel."""
    if rgb.ndim != 3:
        return rgb
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


def split_alpha(arr: np.ndarray, full: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Separate the last channel as alpha, dropping it when every pixel is fully opaque."""
    color, alpha = arr[..., :-1], arr[..., -1]
    if color.shape[-1] == 1:
        color = color[..., 0]
    color = np.ascontiguousarray(color)
    if np.all(alpha == full):
        return color, None
    return color, np.ascontiguousarray(alpha)
