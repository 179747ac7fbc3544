"""The one way cxrcae writes a file: into a temporary name beside it, fsync, then rename into place.

A reader (or a crash) never sees half a file, and a failed write leaves the previous file untouched and no
temporary behind. The finished file gets the permissions a plain ``open()`` would give (0666 less the umask),
not ``mkstemp``'s private 0600, so shared run folders stay readable by the group as users expect.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would switch it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777  # replacing a file keeps its permissions
    except OSError:
        return 0o666 & ~_umask()


class AtomicFile:
    """A file written under a temporary name beside ``path``; ``commit()`` (fsync, permissions, rename)
    makes it appear complete, ``discard()`` removes it. For writers that stream rows over a long run and
    decide at the end (or when interrupted) whether what they have is worth keeping."""

    def __init__(self, path: str | Path, mode: str = "w", **kwargs: Any):
        if mode not in ("w", "wb", "w+b"):
            raise ValueError(f"AtomicFile writes whole files; mode {mode!r} is not 'w', 'wb' or 'w+b'")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "w":
            kwargs.setdefault("encoding", "utf-8")
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            self.file: IO[Any] = os.fdopen(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            Path(self.tmp).unlink(missing_ok=True)
            raise

    def commit(self) -> Path:
        try:
            if not self.file.closed:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            os.chmod(self.tmp, _file_mode(self.path))
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``with atomic_open(path, "w") as f: ...``: ``path`` appears, complete, only if the block succeeds.

    ``mode`` is "w" (text; ``newline``/``encoding`` pass through, utf-8 by default) or "wb".
    """
    target = AtomicFile(path, mode, **kwargs)
    try:
        yield target.file
    except BaseException:
        target.discard()
        raise
    target.commit()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", newline="") as f:
        f.write(text)
