"""Decode once: resized model inputs kept on disk, so later epochs and runs skip PNG/JPEG/DICOM decoding.

``DecodedCache(folder).load(path, size, mode)`` returns what ``load_for_model`` returns, (3, S, S) float32 in
[0, 1]. The first call decodes and stores the resized gray image as uint16 (exact to 1/65535, below what
any 8- to 16-bit source holds after resizing); later calls read that array back. Entries are keyed by the
file's resolved path, size and modification time plus the output size, resize mode and cache format, so an
edited or replaced file is decoded again. Writes are atomic, so DataLoader workers can share one folder.
Augmentation is applied after the cache, on the returned tensor.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from cxrcae._atomic import atomic_write_bytes
from cxrcae.io.resize import load_for_model

CACHE_FORMAT = 2  # 2: large JPEGs drafted to >= 2x the size (not 1x), other large images box-reduced to 3x
SCALE = 65535.0


class DecodedCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def key(self, path: str | Path, size: int, mode: str) -> str:
        resolved = Path(path).resolve()
        stat = resolved.stat()
        text = f"{CACHE_FORMAT}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{int(size)}|{mode}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def entry(self, path: str | Path, size: int, mode: str) -> Path:
        key = self.key(path, size, mode)
        return self.folder / key[:2] / f"{key}.npy"

    def load(self, path: str | Path, size: int, mode: str = "stretch") -> np.ndarray:
        """``load_for_model(path, size, mode)``, decoded at most once per file version."""
        entry = self.entry(path, size, mode)
        try:
            gray = np.load(entry, allow_pickle=False).astype(np.float32) / SCALE
        except (OSError, ValueError):  # not cached yet (or a damaged entry): decode and store
            image = load_for_model(path, size, mode)
            stored = np.round(image[0] * SCALE).astype(np.uint16)
            buf = io.BytesIO()
            np.save(buf, stored, allow_pickle=False)
            try:
                atomic_write_bytes(entry, buf.getvalue())
            except OSError:
                pass  # a full or read-only cache only costs speed
            gray = stored.astype(np.float32) / SCALE
        return np.ascontiguousarray(np.broadcast_to(gray, (3, *gray.shape)), dtype=np.float32)
