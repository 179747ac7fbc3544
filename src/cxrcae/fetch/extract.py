"""Unpack a downloaded zip or tar archive without letting it write anywhere else (zip-slip) or fill the disk.

Every member is checked before anything is written: absolute paths, drive letters, ``..`` components,
symlinks, hard links, device files and FIFOs reject the whole archive, as does a total size over the cap.
Files are unpacked into a temporary folder next to the destination and renamed into place only when all of
them are written, so a failed extraction leaves nothing half-done. macOS resource forks (``__MACOSX/``,
``._*``) are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cxrcae.errors import DataError
from cxrcae.progress import ProgressFn, no_progress

DEFAULT_MAX_BYTES = 64 << 30
"""Largest total uncompressed size accepted (64 GiB; the paper's largest archive unpacks to ~3.5 GB)."""
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20


class UnsafeArchiveError(DataError):
    """An archive member would escape the destination, is a link or device, or the archive is too large."""


@dataclass(frozen=True)
class _Member:
    name: str  # validated, POSIX, relative
    is_dir: bool
    size: int
    handle: object  # ZipInfo or TarInfo


def safe_extract(
    archive: Path,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: ProgressFn = no_progress,
    task: str = "extract",
) -> tuple[int, int]:
    """Unpack ``archive`` (zip, tar, tar.gz/bz2/xz) into ``dest``, replacing it; returns (files, bytes)."""
    archive, dest = Path(archive), Path(dest)
    with _open(archive) as (kind, container):
        members = _members(kind, container, archive)
        total = sum(m.size for m in members if not m.is_dir)
        if total > max_bytes:
            raise UnsafeArchiveError(
                f"{archive}: unpacks to {total / 1e9:.2f} GB, over the {max_bytes / 1e9:.2f} GB limit"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if free < total:
            raise DataError(
                f"{archive}: unpacking needs {total / 1e9:.2f} GB, only {free / 1e9:.2f} GB free"
                f" in {dest.parent}"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            files, written = _write_all(
                kind, container, members, tmp, total, max_bytes, progress, task, archive
            )
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return files, written


@contextmanager
def _open(archive: Path) -> Iterator[tuple[str, zipfile.ZipFile | tarfile.TarFile]]:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                yield "zip", zf
            return
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                yield "tar", tf
            return
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DataError(f"{archive}: corrupt archive ({exc})") from None
    raise DataError(f"{archive}: not a zip or tar archive")


def _skipped(name: str) -> bool:
    parts = name.split("/")
    return parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def check_member_name(name: str, archive: Path) -> str:
    """The member's path as a safe relative POSIX path, or ``UnsafeArchiveError``."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member name with a NUL byte: {name!r}")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise UnsafeArchiveError(f"{archive}: absolute path in archive: {name!r}")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: path escapes the destination ('..'): {name!r}")
    return "/".join(parts)


def _members(kind: str, container, archive: Path) -> list[_Member]:
    out: list[_Member] = []
    if kind == "zip":
        for info in container.infolist():
            name = check_member_name(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: symlink in archive: {info.filename!r}")
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise UnsafeArchiveError(f"{archive}: device or special file in archive: {info.filename!r}")
            if info.flag_bits & 0x1:
                raise DataError(f"{archive}: encrypted member {info.filename!r} is not supported")
            if name and not _skipped(name):
                out.append(_Member(name, info.is_dir(), info.file_size, info))
    else:
        for info in container.getmembers():
            name = check_member_name(info.name, archive)
            if info.issym() or info.islnk():
                raise UnsafeArchiveError(f"{archive}: link in archive: {info.name!r} -> {info.linkname!r}")
            if info.isdev():
                raise UnsafeArchiveError(f"{archive}: device or special file in archive: {info.name!r}")
            if not (info.isfile() or info.isdir()):
                raise UnsafeArchiveError(f"{archive}: unsupported member type in archive: {info.name!r}")
            if name and not _skipped(name):
                out.append(_Member(name, info.isdir(), info.size, info))
    return out


def _write_all(kind, container, members, root, total, max_bytes, progress, task, archive) -> tuple[int, int]:
    written = files = 0
    for member in members:
        target = root.joinpath(*member.name.split("/"))
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source: IO[bytes] | None
        source = container.open(member.handle) if kind == "zip" else container.extractfile(member.handle)
        if source is None:
            raise DataError(f"{archive}: cannot read member {member.name!r}")
        try:
            with source, open(target, "xb") as out:
                while chunk := source.read(_CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise UnsafeArchiveError(f"{archive}: unpacks to more than {max_bytes / 1e9:.2f} GB")
                    out.write(chunk)
                    progress(task, written, total, "")
        except FileExistsError:
            raise UnsafeArchiveError(f"{archive}: member listed twice: {member.name!r}") from None
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise DataError(f"{archive}: corrupt member {member.name!r} ({exc})") from None
        files += 1
    progress(task, written, total, f"{files} files")
    return files, written
