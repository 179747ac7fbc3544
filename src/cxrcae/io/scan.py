"""Turn command-line inputs (files, folders, globs) into sorted image files plus what was skipped and why."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".dic"}
)
_GLOB_CHARS = set("*?[")


def has_dicom_magic(path: str | Path) -> bool:
    """DICOM Part 10 files carry b"DICM" after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _image_reason(path: Path) -> str | None:
    """None when a file found by scanning should be loaded, else why it is skipped."""
    if path.name.startswith("."):
        return "hidden file"
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    # DICOM files are often named by number or UID ("IM0001", "1.2.840.1134.7"): sniff those.
    if (not suffix or suffix[1:].isdigit()) and has_dicom_magic(path):
        return None
    return f"not an image file ({suffix or 'no extension'})"


def _walk(root: Path, recursive: bool, files: list[Path], skipped: list[tuple[Path, str]]) -> None:
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        here = Path(dirpath)
        for name in sorted(dirnames):
            if name.startswith("."):
                skipped.append((here / name, "hidden directory"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in sorted(filenames):
            p = here / name
            reason = _image_reason(p)
            if reason is None:
                files.append(p)
            else:
                skipped.append((p, reason))


def find_images(
    inputs: Sequence[str | Path], recursive: bool = True
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files, folders and glob patterns into sorted unique image paths, and (path, reason) skips.

    Files named explicitly are always returned, so an unreadable one becomes an error row later rather than
    vanishing; files met while scanning a folder or glob are kept only if they look like images.
    """
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            _walk(path, recursive, files, skipped)
        elif path.exists() or path.is_symlink():
            files.append(path)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                skipped.append((path, "no match"))
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    _walk(mp, recursive, files, skipped)
                else:
                    reason = _image_reason(mp)
                    if reason is None:
                        files.append(mp)
                    else:
                        skipped.append((mp, reason))
        else:
            skipped.append((path, "no such file or directory"))
    unique = sorted(set(files), key=str)
    return unique, skipped
