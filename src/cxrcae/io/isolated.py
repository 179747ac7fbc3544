"""Decode with a library that can crash the whole process, in a forked child, so a damaged file costs one
``ImageLoadError`` instead of the run.

Fuzzing (``tests/test_fuzz_io.py``) found that gdcm, the C++ decoder pydicom uses first for JPEG, JPEG-LS
and JPEG 2000 DICOMs (and the only one installed for JPEG lossless and JPEG-LS), aborts or segfaults on
damaged pixel data within a few dozen bit flips: an uncaught C++ exception ends in ``std::terminate``,
which no Python handler can catch, so one bad file in a hospital export stopped a whole predict or training
run. ``decode_apart(fn)`` runs ``fn`` (a pydicom decode, with pydicom's usual choice and order of plugins, so
the pixels are the same) in a ``fork``-ed child that sends the array back through a pipe: an exception comes
back as the same built-in exception type and message, a crash as a ``DecoderCrash``. The child never
touches torch, and copy-on-write makes the fork cheap next to decoding a radiograph. Where ``fork`` is not
the platform's way (not Linux), ``fn`` runs in the process as before.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import struct
import sys
from collections.abc import Callable

import numpy as np

CAN_FORK = sys.platform.startswith("linux") and hasattr(os, "fork")


class DecoderCrash(RuntimeError):
    """The decoder killed its (child) process: the file is damaged in a way the library does not handle."""


def decode_apart(fn: Callable[[], np.ndarray]) -> np.ndarray:
    """``fn()`` run in a forked child (see the module docstring); its array, or its exception, here."""
    if not CAN_FORK:
        return fn()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: decode, send, leave without running any of the parent's exit handlers
        try:
            os.close(read_end)
            _send(write_end, fn)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
    finally:
        _, status = os.waitpid(pid, 0)
    return _receive(data, status)


def _send(fd: int, fn: Callable[[], np.ndarray]) -> None:
    try:
        arr = np.ascontiguousarray(fn())
        head = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
        body = memoryview(arr).cast("B") if arr.size else b""
    except BaseException as exc:  # a Rust decoder's panic is a BaseException too
        head, body = {"error": type(exc).__name__, "message": str(exc)}, b""
    header = json.dumps(head).encode()
    with os.fdopen(fd, "wb") as pipe:
        pipe.write(struct.pack("<Q", len(header)) + header)
        pipe.write(body)


def _receive(data: bytes, status: int) -> np.ndarray:
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else None
    if n is None or len(data) < 8 + n:
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise DecoderCrash(f"the pixel decoder crashed ({how})")
    head = json.loads(data[8 : 8 + n])
    if "error" in head:
        kind = getattr(builtins, head["error"], None)
        kind = kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError
        raise kind(head["message"])
    dtype, shape = np.dtype(head["dtype"]), tuple(head["shape"])
    if not np.prod(shape, dtype=np.int64):
        return np.empty(shape, dtype)
    return np.frombuffer(data, dtype, offset=8 + n).reshape(shape).copy()  # writable, like pydicom's
