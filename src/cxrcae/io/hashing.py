"""Fingerprint decoded pixels, so the same image in PNG, TIFF or BMP (or re-wrapped DICOM) hashes equal.

``hash_files`` is the one thread pool that hashes many files (``pixel_hash`` by default): splits and the
audit both use it, and ``cxrcae reproduce`` hands the split's pixel hashes on to the audit, so each image
is pixel-hashed once per run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from cxrcae.errors import CxrcaeError
from cxrcae.io.decode import decode_native
from cxrcae.io.limits import DEFAULT_MAX_PIXELS
from cxrcae.progress import ProgressFn, no_progress

HASH_TASK = "hashing pixels"
"""Progress task name of ``hash_files`` unless the caller names another."""

T = TypeVar("T")


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


@dataclass(frozen=True)
class FileHashes(Generic[T]):
    """What ``hash_files`` found, per distinct path: its hash, or why it could not be read."""

    hashes: dict[Path, T] = field(default_factory=dict)
    errors: dict[Path, str] = field(default_factory=dict)

    def error_list(self) -> list[tuple[Path, str]]:
        """Unreadable files as (path, reason), sorted by path."""
        return sorted(self.errors.items(), key=lambda e: str(e[0]))


def failure_reason(exc: BaseException) -> str:
    """One line for a file that could not be hashed: the loader's reason, else the error itself."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    if isinstance(exc, CxrcaeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"  # a decoder's own error that slipped through


def hash_files(
    paths: Iterable[Path],
    hasher: Callable[[Path], T] = pixel_hash,
    *,
    workers: int | None = None,
    progress: ProgressFn = no_progress,
    task: str = HASH_TASK,
) -> FileHashes[T]:
    """``hasher`` (default ``pixel_hash``) of each distinct path on a thread pool; failures are collected.

    Decoding releases the GIL, so threads use every core without pickling paths to processes. A file
    whose hasher raises ``CxrcaeError``, ``OSError`` or ``ValueError`` lands in ``errors`` with a one-line
    reason; anything else is a bug and propagates. Both mappings follow the input order (first occurrence),
    never the order in which threads finish. ``progress(task, done, total, info)`` counts distinct files.
    """
    unique = list(dict.fromkeys(paths))
    workers = workers or min(8, os.cpu_count() or 1)
    hashes: dict[Path, T] = {}
    errors: dict[Path, str] = {}
    total = len(unique)
    progress(task, 0, total)
    if unique:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxrcae-hash") as pool:
            futures = {pool.submit(hasher, p): p for p in unique}
            for done, future in enumerate(as_completed(futures), start=1):
                path = futures[future]
                try:
                    hashes[path] = future.result()
                except (CxrcaeError, OSError, ValueError) as exc:
                    errors[path] = failure_reason(exc)
                progress(task, done, total, f"{len(errors)} unreadable" if errors else "")
    return FileHashes(
        hashes={p: hashes[p] for p in unique if p in hashes},
        errors={p: errors[p] for p in unique if p in errors},
    )
