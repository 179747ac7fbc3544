"""What the page shows besides the numbers: a preview of the decoded image, the Grad-CAM overlay drawn on it,
and, for DICOM, how its intensities were windowed.

The preview is the image as the model's decoder saw it (``load_xray``: LUTs and window applied, MONOCHROME1
inverted, EXIF orientation), shrunk to at most ``PREVIEW_SIZE`` pixels on its long side, so a browser can show
a DICOM or 16-bit TIFF it could not open itself. The heat map comes out of Grad-CAM in the model's square
input; ``cam_on_image`` undoes that geometry (the letterbox of ``resize_mode="pad"``, or the stretch) so the
overlay lies on the anatomy of the preview. The DICOM summary holds display settings only (window, VOI LUT,
photometric interpretation, bit depth): no tag that could identify a patient is read out.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from cxrcae.infer.explain import overlay

PREVIEW_SIZE = 512


def shrink(image: np.ndarray, max_side: int = PREVIEW_SIZE) -> np.ndarray:
    """A float HxW image with its long side at most ``max_side`` (aspect kept), values clipped to [0, 1]."""
    h, w = image.shape
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return np.clip(image, 0.0, 1.0).astype(np.float32)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.clip(np.asarray(pil.resize(size, Image.Resampling.BICUBIC), dtype=np.float32), 0.0, 1.0)


def cam_on_image(cam: np.ndarray, image_shape: tuple[int, int], mode: str) -> np.ndarray:
    """A (S, S) heat map of the model input mapped onto an image of ``image_shape`` (H, W).

    Mirrors ``cxrcae.io.resize_xray``: in "pad" mode the image sat centred in the square with its aspect
    kept, so only that window of the heat map belongs to it; in "stretch" mode the whole square does.
    """
    size = cam.shape[0]
    h, w = image_shape
    if mode == "pad":
        scale = size / max(h, w)
        new_h, new_w = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
        top, left = (size - new_h) // 2, (size - new_w) // 2
        cam = cam[top : top + new_h, left : left + new_w]
    pil = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), mode="F")
    return np.clip(np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32), 0.0, 1.0)


def overlay_png(image: np.ndarray, cam: np.ndarray, mode: str) -> str:
    """The Grad-CAM overlay (``cxrcae.infer.explain.overlay``) on ``image``, as base64 PNG."""
    return png_base64(overlay(image, cam_on_image(cam, image.shape, mode)))


def preview_png(image: np.ndarray) -> str:
    return png_base64((np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))


def png_base64(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)  # 2-3x faster than 6, ~10% larger
    return base64.b64encode(buf.getvalue()).decode("ascii")


def dicom_display(path: str | Path) -> dict[str, Any]:
    """How the DICOM's stored values became the gray levels shown (see ``cxrcae.io.dicom``), header only."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    centers, widths = _values(ds.get("WindowCenter")), _values(ds.get("WindowWidth"))
    voi = ds.get("VOILUTSequence")
    info: dict[str, Any] = {
        "photometric_interpretation": photometric,
        "bits_stored": _int(ds.get("BitsStored")),
        "window": None,
        "windows_in_file": min(len(centers), len(widths)),
    }
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        info["intensity"] = "colour image: luminance on the full bit range"
    elif voi and "LUTData" in voi[0]:
        info["intensity"] = "VOI LUT from the file"
    elif centers and widths:
        info["window"] = {
            "center": centers[0],
            "width": widths[0],
            "function": str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR"),
        }
        explanation = _values(ds.get("WindowCenterWidthExplanation"), cast=str)
        if explanation:
            info["window"]["explanation"] = explanation[0]
        info["intensity"] = "window from the file (first one)"
    else:
        info["intensity"] = "no window in the file: full range of the pixel values"
    if photometric == "MONOCHROME1":
        info["intensity"] += "; MONOCHROME1 inverted so bone is bright"
    return info


def _values(value: Any, cast: Any = float) -> list[Any]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    out = []
    for item in items:
        try:
            out.append(cast(item))
        except (TypeError, ValueError):
            continue
    return out


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
