"""Where and how tensors run: device choice, mixed precision and seeding, decided in one place.

Every command that runs a model resolves ``--device`` and ``--precision`` here, so "auto" means the same
thing for training, evaluation, prediction and benchmarks.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
import torch

from cxrcae.errors import CxrcaeError

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is a clear error."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CxrcaeError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CxrcaeError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise CxrcaeError(f"device {name!r} requested but only {count} CUDA device(s) are visible")
    elif device.type == "mps":
        if not _mps_available():
            raise CxrcaeError("device 'mps' requested but Apple MPS is not available on this machine")
    elif device.type != "cpu":
        raise CxrcaeError(f"unsupported device {name!r}; use one of {', '.join(DEVICES)}")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is expected to be faster than fp32 on ``device`` (used by ``auto``)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_fast()
    if device.type == "mps":
        return True
    return False


def cpu_bf16_fast() -> bool:
    """bf16 autocast pays off on CPUs with AMX tiles (Sapphire Rapids and later).

    Measured on an avx512_bf16 CPU without AMX (the project's dev machine): the CAE training step at
    224 px, batch 16, ran at 3.7 img/s in bf16 + channels_last vs 5.4 img/s in fp32 + channels_last, so
    oneDNN's bf16 support alone (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is not a reason to use it.
    """
    try:
        if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32 (no autocast).

    ``auto`` = bf16 where the hardware runs it faster than fp32 (CUDA/MPS with bf16, CPUs with AMX), else
    fp32. fp16 needs a GPU: on CPU it is
    refused with a clear error (CPU fp16 autocast is slow and gives no speed-up).
    """
    precision = (precision or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise CxrcaeError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(device) else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not bf16_supported(device):
            raise CxrcaeError("bf16 requested but this GPU does not support it; use --precision fp16 or fp32")
        return torch.bfloat16
    if device.type == "cpu":
        raise CxrcaeError("fp16 autocast is only supported on GPUs; use --precision bf16 or fp32 on CPU")
    return torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """The ``--precision`` spelling of a resolved dtype, for configs and reports."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op context when running in fp32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def reproducible(seed: int, *, deterministic: bool = True) -> Iterator[None]:
    """Inside the block: Python, NumPy and torch RNGs seeded, and (with ``deterministic``) torch asked for
    reproducible kernels. On leaving, every one of those is put back as it was, so a library call such as
    ``pretrain()`` leaves the caller's process as it found it.

    ``warn_only`` keeps GPU runs going where an op has no deterministic implementation.
    """
    seed = int(seed)
    py_state, np_state = random.getstate(), np.random.get_state()
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    cublas = os.environ.get(CUBLAS_ENV)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            if deterministic:
                if cublas is None:
                    os.environ[CUBLAS_ENV] = ":4096:8"  # cuBLAS reads it when a handle is created
                torch.use_deterministic_algorithms(True, warn_only=True)
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[2], flags[3]
        if cublas is None:
            os.environ.pop(CUBLAS_ENV, None)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader workers: derive Python/NumPy seeds from torch's per-worker seed (itself seeded)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A private CPU generator (shuffling, samplers) so data order never depends on the global RNG."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator
