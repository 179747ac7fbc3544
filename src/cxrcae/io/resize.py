"""Square model inputs: antialiased resize by stretching or aspect-preserving letterbox."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cxrcae.errors import CxrcaeError
from cxrcae.io.decode import load_xray

RESIZE_MODES: tuple[str, ...] = ("stretch", "pad")


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic with Pillow's area-aware support (antialiases when shrinking), clipped to [0, 1]."""
    if img.shape == (height, width):
        return img.astype(np.float32, copy=True)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    out = np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def resize_xray(img: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """Resize an HxW [0, 1] image to size x size float32.

    "stretch" scales each axis independently (what the paper did); "pad" keeps the aspect ratio and
    centres the image on black borders, so anatomy is not distorted.
    """
    if mode not in RESIZE_MODES:
        raise CxrcaeError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    if int(size) < 1:
        raise CxrcaeError(f"image size must be a positive integer, got {size}")
    if img.ndim != 2 or 0 in img.shape:
        raise CxrcaeError(f"resize_xray expects a non-empty HxW image, got shape {tuple(img.shape)}")
    size = int(size)
    if mode == "stretch":
        return _resize(img, size, size)
    top, left, new_h, new_w = letterbox_box(*img.shape, size)
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = _resize(img, new_w, new_h)
    return out


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where "pad" puts an HxW image in the size x size input: (top, left, new height, new width).
    Masks follow the same box (``cxrcae.data.masks``), so they stay aligned with their image."""
    scale = size / max(height, width)
    new_h, new_w = max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def load_for_model(path: str | Path, size: int, mode: str = "stretch") -> np.ndarray:
    """The one way a file becomes model input: (3, size, size) float32 in [0, 1], gray replicated to RGB."""

    if mode not in RESIZE_MODES:
        raise CxrcaeError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    img = resize_xray(load_xray(path, target_size=int(size)), size, mode)
    return np.ascontiguousarray(np.broadcast_to(img, (3, *img.shape)), dtype=np.float32)
