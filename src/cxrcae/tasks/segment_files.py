"""Pictures of segmentations: mask PNGs (0/255) and overlays of masks on their X-ray, written atomically.

An overlay fills each predicted structure in its colour over the gray image and, when a reference is given,
outlines the reference mask in the same colour; a caption bar names the structures in their colours and
whatever the caller adds (file, Dice). Images smaller than ``MIN_SIDE`` pixels are enlarged (nearest) so
that a 64 px model's overlay is still readable. Pillow only, no global state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from cxrcae._atomic import atomic_write_bytes

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)
FILL_ALPHA = 0.35
MIN_SIDE = 256
CAPTION_LINE = 14


def gray_image(image: np.ndarray) -> np.ndarray:
    """HxW uint8 from an X-ray array as cxrcae holds them: (3|1, H, W) or (H, W) in [0, 1], or uint8."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise ValueError(f"expected an HxW or CxHxW image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    return np.round(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def mask_png(mask: np.ndarray) -> bytes:
    """A 0/1 mask as an 8-bit PNG, 0 outside and 255 inside."""
    return png_bytes(Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), "L"))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str | Path, data: bytes) -> str:
    atomic_write_bytes(path, data)
    return str(path)


def overlay(
    image: np.ndarray,
    masks: np.ndarray,
    names: Sequence[str],
    references: np.ndarray | None = None,
    caption: str = "",
) -> Image.Image:
    """``masks`` (K, H, W) filled over ``image`` (any form ``gray_image`` takes, same H, W), ``references``
    outlined; a caption bar below with the structure names in their colours and ``caption``."""
    gray = gray_image(image)
    masks = np.asarray(masks, dtype=bool)
    if masks.shape[-2:] != gray.shape:
        raise ValueError(f"masks {masks.shape[-2:]} and image {gray.shape} differ in size")
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    for k, mask in enumerate(masks):
        colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float32)
        rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
    if references is not None:
        for k, ref in enumerate(np.asarray(references, dtype=bool)):
            border = ref & ~ndimage.binary_erosion(ref, border_value=0)
            rgb[border] = PALETTE[k % len(PALETTE)]
    picture = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    scale = max(1, -(-MIN_SIDE // max(picture.size)))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return _captioned(picture, names, caption, outlined=references is not None)


def _captioned(picture: Image.Image, names: Sequence[str], caption: str, outlined: bool) -> Image.Image:
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(picture)
    places, x, row = [], 4, 0  # the legend: each structure in its colour, wrapped to the picture's width
    for name in names:
        width = int(measure.textlength(name, font=font))
        if x > 4 and x + width > picture.width - 4:
            x, row = 4, row + 1
        places.append((x, row))
        x += width + 10
    how = "filled: predicted, outline: reference" if outlined else "filled: predicted"
    lines = [line for line in (caption, how) if line]
    legend_rows = row + 1 if names else 0
    height = CAPTION_LINE * (legend_rows + len(lines)) + 6
    out = Image.new("RGB", (picture.width, picture.height + height), (0, 0, 0))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    top = picture.height + 3
    for k, (name, (x, row)) in enumerate(zip(names, places, strict=True)):
        draw.text((x, top + row * CAPTION_LINE), name, fill=PALETTE[k % len(PALETTE)], font=font)
    for i, line in enumerate(lines):
        draw.text((4, top + (legend_rows + i) * CAPTION_LINE), line, fill=(255, 255, 255), font=font)
    return out
