"""Fingerprint decoded pixels, so the same image in PNG, TIFF or BMP (or re-wrapped DICOM) hashes equal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cxrcae.io.decode import decode_native
from cxrcae.io.limits import DEFAULT_MAX_PIXELS


def _feed(h, name: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    native = arr.dtype.newbyteorder("<") if arr.dtype.byteorder not in ("|", "<", "=") else arr.dtype
    arr = arr.astype(native.newbyteorder("<"), copy=False)
    h.update(f"{name}:{arr.dtype.str}:{'x'.join(map(str, arr.shape))};".encode())
    h.update(arr.tobytes())


def pixel_hash(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str:
    """sha256 hex of the decoded pixels at native precision (dtype and shape included).

    Raster files hash their oriented pixels after dropping a fully opaque alpha channel and collapsing
    gray-stored-as-RGB to one channel; DICOM hashes the stored values of its first frame. The same pixel
    limit as load_xray applies. Raises ImageLoadError.
    """
    native, dicom = decode_native(path, max_pixels=max_pixels)
    h = hashlib.sha256()
    if native is not None:
        _feed(h, "pixels", native.pixels)
        if native.alpha is not None:
            _feed(h, "alpha", native.alpha)
    else:
        _feed(h, "pixels", dicom[1])
    return h.hexdigest()
