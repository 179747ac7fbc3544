"""Unpack a downloaded zip or tar archive without letting it write anywhere else (zip-slip) or fill the disk.

Zip members are checked by hand before anything is written: absolute paths, drive letters, ``..``
components, symlinks, device files and FIFOs reject the whole archive. Tar members go through the standard
library's ``"data"`` extraction filter (``tarfile.data_filter``, Python >= 3.10.12 / 3.11.4; older Pythons
get a clear error instead of an unchecked extraction): a leading ``/`` is stripped, a member or link that
would land outside the destination and device files / FIFOs reject the archive, permission bits are
tamed. On top of that filter, tar links of any kind are refused: no registered dataset has them, and the
filter's link handling had bypasses fixed only in Python 3.10.18 / 3.11.13 / 3.12.11 / 3.13.4. Every member
is checked before the first byte is written, and again by ``tarfile`` as it extracts.

A total size over the cap and a total over the free disk space are refused before unpacking. Files are
unpacked into a temporary folder next to the destination and renamed into place only when all of them are
written, so a failed extraction leaves nothing half-done. macOS resource forks (``__MACOSX/``, ``._*``) are
skipped.
"""

from __future__ import annotations

import os
import platform
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
    handle: zipfile.ZipInfo


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
        if kind == "tar" and not hasattr(tarfile, "data_filter"):
            raise DataError(
                f"{archive}: unpacking a tar archive safely needs Python >= 3.10.12 or >= 3.11.4 "
                f"(tarfile's 'data' extraction filter); this is Python {platform.python_version()}"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            if isinstance(container, zipfile.ZipFile):
                members = _zip_members(container, archive)
                total = sum(m.size for m in members if not m.is_dir)
                _check_room(archive, dest, total, max_bytes)
                files, written = _write_zip(
                    container, members, tmp, total, max_bytes, progress, task, archive
                )
            else:
                files, written = _extract_tar(container, tmp, max_bytes, progress, task, archive, dest)
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


def _check_room(archive: Path, dest: Path, total: int, max_bytes: int) -> None:
    """The bomb check (``total`` over ``max_bytes``) and the free-disk check, before anything is written."""
    if total > max_bytes:
        raise UnsafeArchiveError(
            f"{archive}: unpacks to {total / 1e9:.2f} GB, over the {max_bytes / 1e9:.2f} GB limit"
        )
    free = shutil.disk_usage(dest.parent).free
    if free < total:
        raise DataError(
            f"{archive}: unpacking needs {total / 1e9:.2f} GB, only {free / 1e9:.2f} GB free in {dest.parent}"
        )


def _skipped(name: str) -> bool:
    parts = name.split("/")
    return parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


# --- zip: checked by hand (zipfile has no extraction filter) ---------------------------------------------


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


def _zip_members(container: zipfile.ZipFile, archive: Path) -> list[_Member]:
    out: list[_Member] = []
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
    return out


def _write_zip(container, members, root, total, max_bytes, progress, task, archive) -> tuple[int, int]:
    written = files = 0
    for member in members:
        target = root.joinpath(*member.name.split("/"))
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source: IO[bytes] = container.open(member.handle)
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
        except (zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{archive}: corrupt member {member.name!r} ({exc})") from None
        files += 1
    progress(task, written, total, f"{files} files")
    return files, written


# --- tar: the standard library's "data" filter ------------------------------------------------------------


def _filter_reason(exc: tarfile.FilterError) -> str:
    if isinstance(exc, tarfile.AbsolutePathError):
        return "absolute path in archive"
    if isinstance(exc, tarfile.OutsideDestinationError):
        return "path escapes the destination"
    if isinstance(exc, (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError)):
        return "link pointing outside the destination"
    if isinstance(exc, tarfile.SpecialFileError):
        return "device or special file in archive"
    return f"refused by tarfile's data filter ({exc})"


def _data_member(member: tarfile.TarInfo, path: str, archive: Path) -> tarfile.TarInfo | None:
    """``tarfile.data_filter`` with this module's errors; None for a member to skip (macOS forks, ``.``)."""
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"{archive}: link in archive: {member.name!r} -> {member.linkname!r}")
    try:
        safe = tarfile.data_filter(member, path)
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"{archive}: {_filter_reason(exc)}: {member.name!r}") from None
    except ValueError as exc:  # e.g. an embedded NUL byte in a pax path
        raise UnsafeArchiveError(f"{archive}: invalid member name {member.name!r} ({exc})") from None
    name = "/".join(p for p in safe.name.split("/") if p not in ("", "."))
    return safe if name and not _skipped(name) else None


def _extract_tar(
    tf: tarfile.TarFile, root: Path, max_bytes, progress, task, archive, dest
) -> tuple[int, int]:
    """Check every member, then the bomb and disk checks, then ``extractall`` with the same filter.

    Corrupt data (``TarError``, ``EOFError``) surfaces through ``_open`` as a one-line ``DataError``.
    """
    path = str(root)
    kept = [m for m in tf.getmembers() if _data_member(m, path, archive) is not None]
    total = sum(m.size for m in kept if m.isreg())
    _check_room(archive, dest, total, max_bytes)
    done = {"files": 0, "bytes": 0}

    def keep(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
        safe = _data_member(member, dest_path, archive)  # again, now against what is on disk
        if safe is not None and safe.isreg():
            progress(task, done["bytes"], total, "")
            done["files"] += 1
            done["bytes"] += safe.size
        return safe

    tf.extractall(path, members=kept, filter=keep)
    progress(task, done["bytes"], total, f"{done['files']} files")
    return done["files"], done["bytes"]
