"""What decoding learns about a file besides its pixels, for the out-of-distribution guard.

``load_for_model`` keeps only the gray model input; colour and the DICOM header are gone after it. The guard
needs both (a strongly coloured image is not a radiograph; a CT slice is refused by its header), so
``load_with_facts`` decodes once and returns the same model input plus ``ImageFacts``: colourfulness of the
original pixels, the spread of the gray image before resizing, and the non-identifying header facts of a
DICOM file (``cxrcae.io.dicom.header_facts``). The facts are plain values, so they cross DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrcae.io.decode import decode_native, unit_pixels
from cxrcae.io.dicom import header_facts
from cxrcae.io.resize import resize_xray

SAMPLE_SIDE = 256  # statistics are taken on a grid of at most this many pixels per side


@dataclass(frozen=True)
class ImageFacts:
    """``kind`` "dicom" or "raster"; ``header`` the DICOM facts (empty for raster files);
    ``colorfulness`` Hasler & Suesstrunk's M on the 0..255 scale (0 for gray; photographs ~30-110);
    ``gray_std`` the standard deviation of the [0, 1] gray image (chest X-rays ~0.15-0.3, blank 0)."""

    kind: str
    header: dict[str, str] = field(default_factory=dict)
    colorfulness: float = 0.0
    gray_std: float = 0.0


def load_with_facts(path: str | Path, size: int, mode: str = "stretch") -> tuple[np.ndarray, ImageFacts]:
    """``(load_for_model(path, size, mode), ImageFacts)`` from one decode (same pixels, same errors)."""
    native, dicom = decode_native(path, target_size=int(size))
    gray = unit_pixels(native, dicom)
    if native is not None:
        facts = ImageFacts("raster", {}, colorfulness(native.pixels, native.white), _std(gray))
    else:
        ds, raw = dicom
        white = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        facts = ImageFacts("dicom", header_facts(ds), colorfulness(raw, white), _std(gray))
    img = resize_xray(gray, size, mode)
    return np.ascontiguousarray(np.broadcast_to(img, (3, *img.shape)), dtype=np.float32), facts


def colorfulness(pixels: np.ndarray, white: float | None = 255.0) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of HxWx3 pixels on the 0..255 scale; 0 for HxW gray.

    M = sqrt(sd(rg)^2 + sd(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2), rg = R - G, yb = (R + G)/2 - B.
    Their scale: 0 not colourful, ~15 slightly, ~33 moderately, ~45 averagely, ~59 quite, ~82 highly.
    """
    if pixels.ndim != 3 or pixels.shape[-1] < 3:
        return 0.0
    rgb = _grid(pixels)[..., :3].astype(np.float64)
    scale = 255.0 / float(white) if white else 255.0 / max(float(rgb.max()), 1e-12)
    rgb = rgb * scale
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    spread = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
    offset = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(spread + 0.3 * offset)


def _std(gray: np.ndarray) -> float:
    return float(_grid(gray).astype(np.float64).std())


def _grid(arr: np.ndarray) -> np.ndarray:
    """Every k-th pixel so that neither side exceeds ``SAMPLE_SIDE`` (statistics need no more)."""
    step = max(1, -(-max(arr.shape[0], arr.shape[1]) // SAMPLE_SIDE))
    return arr[::step, ::step]
