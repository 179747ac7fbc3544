"""Keep freed memory in the process, so the next training step or batch does not page-fault it back in.

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to the kernel on ``free``.
A 224 px step allocates activations of 50-200 MB each, so each step first-touches (and the kernel zeroes)
gigabytes of new pages: measured 15-20% of a CPU training step on 2 cores (the Keras peer keeps its own
pool and does not pay it). ``keep_freed_memory`` makes glibc serve large blocks from its heap and never trim
it, so activations reuse the same pages every step. The cost: the process holds on to its peak memory
until it exits (a training or predict run reaches its peak in the first step anyway).

Because it changes the process for good, only the ``cxrcae`` command (``cxrcae.cli.app.main``, before any
tensor exists) and the benchmark apply it; training, prediction and every other library call leave malloc as
they found it. A Python script that wants the same speed calls ``keep_freed_memory()`` itself, first thing.
Opt out with ``CXRCAE_ALLOCATOR=system``; on a libc other than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ALLOCATOR_ENV = "CXRCAE_ALLOCATOR"
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4

_state = {"applied": None}


def keep_freed_memory() -> bool:
    """Apply once per process (idempotent); returns whether the tuned settings are in effect."""
    if _state["applied"] is None:
        _state["applied"] = _apply()
    return bool(_state["applied"])


def _apply() -> bool:
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() in {"system", "default", "off", "0"}:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt's value is an int: -1 becomes SIZE_MAX inside glibc, i.e. "never trim the heap top".
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def status() -> str:
    """One word for reports and benchmarks: ``kept`` (tuned) or ``system``."""
    return "kept" if _state["applied"] else "system"
