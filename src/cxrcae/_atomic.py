"""The one way cxrcae writes a file: into a temporary name beside it, fsync, then rename into place.

A reader (or a crash) never sees half a file, and a failed write leaves the previous file untouched and no
temporary behind. The finished file gets the permissions a plain ``open()`` would give (0666 less the umask),
not ``mkstemp``'s private 0600, so shared run folders stay readable by the group as users expect.

When the disk is full, the file too large, the folder read-only or not writable, the error is a
``WriteError``: one line naming the file that could not be written (an ``OSError`` and a ``CxrcaeError``,
so the CLI prints it as one line). ``atomic_write_many`` writes several files as one unit (a checkpoint
folder): every temporary is written first and nothing is renamed unless all of them were.
``sweep_temporaries`` removes what a killed process (SIGKILL, power loss) could not;
``uninterrupted`` lets a multi-file write that has begun finish before a Ctrl-C takes effect.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cxrcae.errors import CxrcaeError

_TMP_SUFFIX = ".tmp"
# errors that mean "this place cannot take the file" rather than a bug: named in one line with the path
_WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO", "ENOENT", "ENOTDIR")
    if hasattr(errno, name)
)


class WriteError(CxrcaeError, OSError):
    """A file could not be written (disk full, file too large, read-only or forbidden place).

    The message names the file; the previous version of it, if any, is unchanged and no temporary is left.
    """

    def __init__(self, path: str | Path, exc: OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        super().__init__(exc.errno, reason, str(path))
        self.message = f"{path}: cannot write ({reason}); any previous version is unchanged"

    def __str__(self) -> str:
        return self.message


def as_write_error(path: str | Path, exc: BaseException, *, own: bool = True) -> BaseException:
    """``exc`` as a ``WriteError`` naming ``path`` when it is a file-system failure of that write.

    ``own=False``: ``exc`` came from code writing through the open file, where an error naming some other
    file (``exc.filename``) is about that file and passes through unchanged."""
    if isinstance(exc, WriteError) or not isinstance(exc, OSError):
        return exc
    if not own and exc.filename is not None:
        return exc
    if exc.errno in _WRITE_ERRNOS or isinstance(exc, PermissionError):
        return WriteError(path, exc)
    return exc


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
    decide at the end (or when interrupted) whether what they have is worth keeping.

    ``commit(rename=False)`` stops after the fsync (for ``atomic_write_many``); ``rename()`` finishes."""

    def __init__(self, path: str | Path, mode: str = "w", **kwargs: Any):
        if mode not in ("w", "wb", "w+b"):
            raise ValueError(f"AtomicFile writes whole files; mode {mode!r} is not 'w', 'wb' or 'w+b'")
        self.path = Path(path)
        if mode == "w":
            kwargs.setdefault("encoding", "utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=_TMP_SUFFIX, dir=self.path.parent
            )
        except OSError as exc:
            raise as_write_error(self.path, exc) from None
        try:
            self.file: IO[Any] = os.fdopen(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            Path(self.tmp).unlink(missing_ok=True)
            raise

    def commit(self, rename: bool = True) -> Path:
        try:
            if not self.file.closed:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            os.chmod(self.tmp, _file_mode(self.path))
            if rename:
                os.replace(self.tmp, self.path)
        except BaseException as exc:
            self.discard()
            raise as_write_error(self.path, exc) from None
        return self.path

    def rename(self) -> Path:
        """The last step of ``commit(rename=False)``."""
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise as_write_error(self.path, exc) from None
        return self.path

    def fail(self, exc: BaseException) -> BaseException:
        """Discard the temporary; returns ``exc`` as a ``WriteError`` naming the file where it is one."""
        self.discard()
        return as_write_error(self.path, exc, own=False)

    def discard(self) -> None:
        try:
            if not self.file.closed:
                self.file.close()
        except OSError:  # closing flushes: on a full disk that fails too, and the file goes anyway
            pass
        Path(self.tmp).unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``with atomic_open(path, "w") as f: ...``: ``path`` appears, complete, only if the block succeeds.

    ``mode`` is "w" (text; ``newline``/``encoding`` pass through, utf-8 by default) or "wb".
    """
    target = AtomicFile(path, mode, **kwargs)
    try:
        yield target.file
    except OSError as exc:
        error = target.fail(exc)
        if error is exc:
            raise
        raise error from None
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


def atomic_write_many(files: Mapping[str | Path, bytes]) -> None:
    """Write several files as one unit, in the order given: all temporaries are written and synced before
    the first rename, so a full disk or a forbidden place leaves every previous file as it was. (Only a
    crash between the renames, a few microseconds, can leave some files new and some old.)"""
    targets: list[AtomicFile] = []
    try:
        for path, data in files.items():
            target = AtomicFile(path, "wb")
            targets.append(target)
            try:
                target.file.write(data)
            except OSError as exc:
                raise target.fail(exc) from None
            target.commit(rename=False)
    except BaseException:
        for target in targets:
            target.discard()
        raise
    for i, target in enumerate(targets):
        try:
            target.rename()
        except BaseException:
            for rest in targets[i + 1 :]:
                rest.discard()
            raise


def temporary_names(folder: str | Path, name: str | None = None) -> list[Path]:
    """Temporaries ``AtomicFile`` left in ``folder`` (of file ``name`` only, when given)."""
    folder = Path(folder)
    prefix = f".{name}." if name else "."
    try:
        return sorted(
            p
            for p in folder.iterdir()
            if p.name.startswith(prefix) and p.name.endswith(_TMP_SUFFIX) and p.is_file()
        )
    except OSError:
        return []


def sweep_temporaries(folder: str | Path, name: str | None = None) -> int:
    """Remove the temporaries a killed writer left in ``folder`` (of ``name`` only, when given).

    Only safe while holding the lock of what is written there (``cxrcae.locking``): another live writer's
    temporary looks the same. Returns how many were removed."""
    removed = 0
    for path in temporary_names(folder, name):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise it: a multi-file save that has begun
    (a checkpoint folder, a resume state) always finishes. Outside the main thread, or when SIGINT is not
    Python's default handler, the block runs as is. The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
