"""The CPU speed probe: which precision and memory layout make the CAE training step fastest on this machine.

``auto`` precision and layout on CPU come from measuring, not from CPU flags. The first time a training run
needs them at an image size, ``measure_cpu`` times one forward + backward + SGD step of the paper's CAE in
fp32 (NCHW and NHWC) and, where oneDNN has bf16, in bf16 (NHWC), and keeps the answer per machine in
``$CXRCAE_HOME/probe/`` (``cxrcae.runtime`` reads it back, for inference too). It takes a few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxrcae.models.cae import ConvAutoencoder
from cxrcae.runtime import (
    PROBE_SIZE,
    PROBE_VERSION,
    autocast,
    cpu_choice,
    measured_choices,
    probe_disabled,
    resolve_channels_last,
    resolve_precision,
    save_choice,
)

PROBE_BATCH = 4
BF16_MARGIN = 1.15
"""bf16 is chosen only where the probe measures it at least this much faster than the best fp32 layout."""


def _probe_model(channels_last: bool, image_size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The paper's CAE at the run's image size, batch ``PROBE_BATCH``: every layer shape of the step."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = ConvAutoencoder().to(memory_format=fmt)
    return net, torch.rand(PROBE_BATCH, 3, image_size, image_size).contiguous(memory_format=fmt)


def _time_setting(
    dtype: torch.dtype | None, channels_last: bool, image_size: int = PROBE_SIZE, reps: int = 3
) -> float:
    """Median seconds of one forward + backward + SGD step of the probe model."""
    net, x = _probe_model(channels_last, image_size)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            loss = F.mse_loss(net(x).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms the kernels up
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def probe_cpu(
    image_size: int = PROBE_SIZE, timer: Callable[[torch.dtype | None, bool, int], float] = _time_setting
) -> dict[str, Any]:
    """Time the CAE training step in fp32 (NCHW and NHWC) and, where oneDNN has bf16, in bf16 (NHWC);
    return the fastest fp32 layout and whether bf16 beats it by ``BF16_MARGIN``. Takes a few seconds."""
    settings = {"fp32:nchw": (None, False), "fp32:nhwc": (None, True)}
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        settings["bf16:nhwc"] = (torch.bfloat16, True)
    seconds = {name: timer(*setting, image_size) for name, setting in settings.items()}
    fp32 = min(("fp32:nchw", "fp32:nhwc"), key=seconds.__getitem__)
    bf16 = "bf16:nhwc" in seconds and seconds[fp32] / seconds["bf16:nhwc"] >= BF16_MARGIN
    return {
        "version": PROBE_VERSION,
        "image_size": int(image_size),
        "seconds": seconds,
        "precision": "bf16" if bf16 else "fp32",
        "channels_last": True if bf16 else fp32 == "fp32:nhwc",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def measure_cpu(image_size: int) -> dict[str, Any]:
    """The probe's answer at ``image_size``: read from ``$CXRCAE_HOME/probe/<machine>.json``, measured and
    saved now when this size was never measured here (a few seconds at 224 px). ``CXRCAE_PROBE=off`` skips
    it (fp32, channels_last)."""
    size = int(image_size)
    if probe_disabled() or str(size) in measured_choices():
        return cpu_choice(size)
    result = probe_cpu(size)
    save_choice(size, result)
    return {**result, "source": "measured now"}


def training_precision(
    precision: str, channels_last: bool | None, device: torch.device, image_size: int
) -> tuple[torch.dtype | None, bool]:
    """A training run's autocast dtype and memory layout: ``auto`` on CPU measures the step at the run's
    image size first (once per machine and size), then ``cxrcae.runtime`` resolves both from the answer."""
    auto = (precision or "auto").strip().lower() == "auto" or channels_last is None
    if device.type == "cpu" and auto:
        measure_cpu(image_size)
    dtype = resolve_precision(precision, device, image_size)
    return dtype, resolve_channels_last(channels_last, device, image_size)
