"""Wall-clock timing of repeated calls, synchronised with the device."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def median_seconds(
    step: Callable[[], Any],
    warmup: int,
    steps: int,
    sync: Callable[[], None],
    report: Callable[[int, int], None],
) -> float:
    """Median wall time of ``step`` after ``warmup`` untimed calls (oneDNN picks kernels on the first)."""
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        report(i + 1, warmup + steps)
    times.sort()
    return times[len(times) // 2]


def device_sync(device: torch.device) -> Callable[[], None]:
    """A call that waits for ``device``'s queued work (CUDA), or does nothing (CPU: already done)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
