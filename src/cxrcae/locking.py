"""One writer at a time: a lock file per run folder or output file, naming the process that holds it.

``hold(target)`` is held for as long as a command writes ``target`` (a training run folder, a predict or
embed output file). A second command that wants the same target is refused at once with a one-line
``LockedError`` that names the first one's process id and command line, instead of interleaving its files
with the first one's.

The lock is a POSIX record lock (``fcntl.lockf``) on a small file: ``OUT/.cxrcae.lock`` inside a folder,
``.NAME.lock`` beside a file. The kernel releases it when its process ends in any way, SIGKILL included, so a
lock left by a dead process is stale by construction: the next command finds the file, takes the lock and
writes its own process id over the dead one. Record locks are per process and not inherited by ``fork``, so
DataLoader workers that outlive a killed run never keep its lock; within one process a registry refuses a
second holder. Where ``fcntl`` does not exist (Windows) the file is created exclusively and a lock whose
process is no longer alive is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cxrcae._atomic import as_write_error
from cxrcae.errors import CxrcaeError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FOLDER_LOCK = ".cxrcae.lock"
_HELD: dict[str, int] = {}  # lock files this process holds -> their file descriptor
_GUARD = threading.Lock()


class LockedError(CxrcaeError):
    """Another cxrcae process (or this one) is writing the same run folder or output file."""

    def __init__(self, target: Path, holder: dict):
        self.target = target
        self.holder = holder
        pid = holder.get("pid")
        who = f"process {pid}" if pid else "another process"
        command = holder.get("command")
        what = f" ({command})" if command else ""
        super().__init__(
            f"{target}: in use by {who}{what}; wait for it to finish or stop it, then run this again"
        )


def lock_file(target: str | Path, *, folder: bool) -> Path:
    """Where the lock of ``target`` lives: inside a folder, beside a file."""
    target = Path(target).expanduser()
    return target / FOLDER_LOCK if folder else target.with_name(f".{target.name}.lock")


def holder(target: str | Path, *, folder: bool) -> dict | None:
    """What the lock file of ``target`` says about its holder (pid, host, command, started), or None.

    Only what is written there: whether that process still holds the lock is ``hold``'s business."""
    path = lock_file(target, folder=folder)
    with _GUARD:
        fd = _HELD.get(str(path.resolve()))
        if fd is not None:  # ours: read through our descriptor (closing another one would drop the lock)
            return _read_holder(fd)
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


@contextmanager
def hold(target: str | Path, *, folder: bool) -> Iterator[Path]:
    """Hold the lock of ``target`` (a folder, created if missing, or a file) for the ``with`` block.

    Raises ``LockedError`` naming the holder when another live process (or this one) has it."""
    target = Path(target).expanduser()
    path = lock_file(target, folder=folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise as_write_error(target, exc) from None
    key = str(path.resolve())
    with _GUARD:
        if key in _HELD:
            raise LockedError(target, _read_holder(_HELD[key]) or {"pid": os.getpid()})
        fd = _acquire(path, target)
        _HELD[key] = fd
    try:
        yield path
    finally:
        with _GUARD:
            _HELD.pop(key, None)
            _release(path, fd)


def _record() -> bytes:
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = program.parent.name if program.name == "__main__.py" else program.name  # python -m cxrcae
    command = " ".join([name, *sys.argv[1:]])
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command[:300],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return (json.dumps(info) + "\n").encode()


def _parse(data: bytes) -> dict | None:
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _read_holder(fd: int) -> dict | None:
    try:
        return _parse(os.pread(fd, 4096, 0))
    except OSError:
        return None


def _acquire(path: Path, target: Path) -> int:
    if fcntl is None:  # pragma: no cover - Windows
        return _acquire_exclusive(path, target)
    for _ in range(20):  # retried only when the file was replaced between open and lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise as_write_error(target, exc) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = _read_holder(fd)
            for _ in range(10):  # the holder may have locked but not yet written its record
                if info is not None:
                    break
                time.sleep(0.05)
                info = _read_holder(fd)
            os.close(fd)
            raise LockedError(target, info or {}) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file while we opened it: lock the new one
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _record(), 0)
        except OSError as exc:
            os.close(fd)
            raise as_write_error(target, exc) from None
        return fd
    raise LockedError(target, {})  # pragma: no cover - 20 replacements in a row


def _release(path: Path, fd: int) -> None:
    try:
        path.unlink()  # while still locked: a waiting process then sees a new file (checked in _acquire)
    except OSError:
        pass
    os.close(fd)


def _alive(pid: int) -> bool:  # pragma: no cover - only the Windows fallback asks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _acquire_exclusive(path: Path, target: Path) -> int:  # pragma: no cover - Windows
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                info = _parse(path.read_bytes()) or {}
            except OSError:
                continue
            pid = info.get("pid")
            if isinstance(pid, int) and _alive(pid):
                raise LockedError(target, info) from None
            path.unlink(missing_ok=True)  # a dead process's lock: take it over
            continue
        except OSError as exc:
            raise as_write_error(target, exc) from None
        os.write(fd, _record())
        return fd
    raise LockedError(target, {})
