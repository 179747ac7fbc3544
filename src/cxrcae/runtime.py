"""Where and how tensors run: device choice, mixed precision, memory layout and seeding, in one place.

``auto`` precision and layout on CPU come from measuring, not from CPU flags: the first time a training run
needs them, the speed probe (``cxrcae.train.speed``) times the CAE training step in each setting, and the
answer is kept per machine and image size in ``$CXRCAE_HOME/probe/``, which this module reads.

Every command that runs a model resolves ``--device`` and ``--precision`` here, so "auto" means the same
thing for training, evaluation, prediction and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrcae._atomic import atomic_write_text
from cxrcae.errors import CxrcaeError
from cxrcae.paths import home_dir

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
PROBE_ENV = "CXRCAE_PROBE"
"""``CXRCAE_PROBE=off`` skips the speed probe: ``auto`` then means fp32 with channels_last."""
PROBE_VERSION = 2  # 2: the CPU fast paths (cxrcae.models.cae) and the allocator changed the timings
PROBE_SIZE = 128

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


def bf16_supported(device: torch.device, image_size: int | None = None) -> bool:
    """Whether bf16 autocast is expected to be faster than fp32 on ``device`` (used by ``auto``)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_fast(image_size)
    if device.type == "mps":
        return True
    return False


# ----------------------------------------------------------------------------------------- speed probe cache


def machine_key() -> str:
    """What the probe's answer depends on: CPU model, kernel ISA (``ATEN_CPU_CAPABILITY`` and oneDNN's limit
    included), thread count and torch version. A different machine or setting gets a fresh probe."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    parts = [
        model,
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        str(torch.get_num_threads()),
        str(PROBE_VERSION),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def probe_disabled() -> bool:
    """``CXRCAE_PROBE=off`` (or 0/no/false)."""
    return os.environ.get(PROBE_ENV, "").strip().lower() in ("0", "off", "no", "false")


def probe_file() -> Path:
    """``$CXRCAE_HOME/probe/<machine>.json``: the probe's answers for this machine, by image size."""
    return home_dir() / "probe" / f"{machine_key()}.json"


def measured_choices() -> dict[str, dict[str, Any]]:
    """The answers measured on this machine by the current probe version, keyed by image size (as text)."""
    try:
        known = json.loads(probe_file().read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if isinstance(v, dict) and v.get("version") == PROBE_VERSION}


def save_choice(image_size: int, result: dict[str, Any]) -> None:
    """Add the probe's answer at ``image_size`` to this machine's file (a read-only home only means
    measuring again next time)."""
    answers = {**measured_choices(), str(int(image_size)): result}
    try:
        atomic_write_text(probe_file(), json.dumps(answers, indent=1) + "\n")
    except OSError:
        pass


def cpu_choice(image_size: int | None = None) -> dict[str, Any]:
    """What the speed probe (``cxrcae.train.speed``) measured on this machine: the answer at ``image_size``
    when that size was measured (the best layout changes with the size), else the nearest measured size
    (``PROBE_SIZE`` without a size), else fp32 with channels_last. Nothing is measured here: training
    measures its size first (``cxrcae.train.speed.measure_cpu``), inference reuses what training measured.
    ``CXRCAE_PROBE=off`` skips it (fp32, channels_last)."""
    default = {"precision": "fp32", "channels_last": True}
    if probe_disabled():
        return {**default, "source": "default (CXRCAE_PROBE=off)"}
    known = measured_choices()
    target = PROBE_SIZE if image_size is None else int(image_size)
    sizes = sorted(known, key=lambda k: abs(int(k) - target))
    if not sizes:
        return {**default, "source": "default"}
    return {**known[sizes[0]], "source": str(probe_file())}


def resolve_channels_last(
    channels_last: bool | None, device: torch.device, image_size: int | None = None
) -> bool:
    """``None`` (auto) = what the probe measured faster on this CPU; NHWC on GPUs."""
    if channels_last is not None:
        return bool(channels_last)
    return bool(cpu_choice(image_size)["channels_last"]) if device.type == "cpu" else True


def cpu_bf16_fast(image_size: int | None = None) -> bool:
    """Whether bf16 autocast is measured faster than fp32 on this CPU (``cpu_choice``), not assumed from CPU
    flags: on an avx512_bf16 CPU without AMX bf16 was slower (3.7 vs 5.4 img/s for the CAE step)."""
    return cpu_choice(image_size)["precision"] == "bf16"


def resolve_precision(
    precision: str, device: torch.device, image_size: int | None = None
) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32 (no autocast).

    ``auto`` = bf16 where the hardware runs it faster than fp32 (CUDA/MPS with bf16; on CPU where the speed
    probe measured it faster), else fp32. fp16 needs a GPU: on CPU it is
    refused with a clear error (CPU fp16 autocast is slow and gives no speed-up).
    """
    precision = (precision or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise CxrcaeError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(device, image_size) else None
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


MAX_WORKERS = 4
"""Most loader worker processes a command starts on its own (more rarely repay their start-up and memory)."""


def default_workers(num_workers: int | None = None) -> int:
    """``num_workers`` if given, else the loader worker processes every command uses by default: CPUs-2,
    at most ``MAX_WORKERS``.

    One rule for training and decoding: the model (a training step, a forward pass) keeps two cores, as
    measured on 2 cores at 224 px: a training pass over cached real files ran at 78% of the in-memory step
    rate with 1 worker and 103% with none; prediction ran at 9.6 img/s with 1 worker and 14.9 with none.
    ``predict`` and ``embed`` go one step further and choose by timing their first batch
    (``cxrcae.infer.workers``), never more than ``MAX_WORKERS``. Library functions default to 0 (a Python
    call starts no processes unless asked); the CLI resolves its default here.
    """
    if num_workers is not None:
        return num_workers
    return max(0, min(MAX_WORKERS, (os.cpu_count() or 1) - 2))
