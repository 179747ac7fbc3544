"""``load_xray``: any supported file -> float32 HxW in [0, 1], bone bright. The one pixel contract."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from cxrcae.errors import ImageLoadError
from cxrcae.io.dicom import dicom_to_unit, read_dicom
from cxrcae.io.limits import DEFAULT_MAX_PIXELS, resolve_max_pixels
from cxrcae.io.native import NativeImage
from cxrcae.io.raster import decode_raster


def _sniff(path: Path) -> bytes:
    """First 132 bytes, turning every file-system failure into a one-line ImageLoadError."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.ENOENT:
            reason = "no such file"
        raise ImageLoadError(path, f"cannot read file ({reason})") from None
    if not head:
        raise ImageLoadError(path, "empty file")
    return head


def _is_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def decode_native(
    path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, target_size: int | None = None
) -> tuple[NativeImage | None, object]:
    """(raster image, None) or (None, (dicom dataset, stored pixels)): what load_xray and pixel_hash share."""
    path = Path(path)
    limit = resolve_max_pixels(max_pixels)
    head = _sniff(path)
    if _is_dicom(head):
        return None, read_dicom(path, max_pixels=limit)

    return decode_raster(path, max_pixels=limit, target_size=target_size), None


def load_xray(
    path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, target_size: int | None = None
) -> np.ndarray:
    """Decode an X-ray to float32 HxW in [0, 1] with bone bright (MONOCHROME2).

    PNG (8/16-bit, any mode), JPEG (EXIF orientation applied), TIFF, BMP and DICOM (recognised by its
    ``DICM`` magic, not its name). Colour becomes BT.601 luminance; integer images are divided by their
    full scale (255 or 65535) so relative brightness is kept; DICOM follows its LUTs
    (see ``cxrcae.io.dicom``).
    ``target_size`` lets large images decode at reduced resolution: JPEGs by DCT scaling (short side still
    >= 2 x target_size), other 8-bit gray or RGB images by box averaging (>= 3 x); see
    ``cxrcae.io.raster.DRAFT_MARGIN`` and ``REDUCE_MARGIN``.
    ``max_pixels`` (default 100 MP, or $CXRCAE_MAX_PIXELS; None = no limit) guards against decompression
    bombs.
    Raises ImageLoadError with a one-line reason for anything that is not a complete, supported image.
    """
    return unit_pixels(*decode_native(path, max_pixels=max_pixels, target_size=target_size))


def unit_pixels(native: NativeImage | None, dicom: object) -> np.ndarray:
    """The pixel contract applied to what ``decode_native`` returned (shared by ``load_xray`` and the
    out-of-distribution facts, ``cxrcae.io.facts``, so both see the same pixels)."""
    if native is not None:
        return native.to_unit()
    ds, raw = dicom
    return dicom_to_unit(ds, raw)
