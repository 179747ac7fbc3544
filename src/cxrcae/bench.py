"""Micro-benchmarks of the training step, so precision / memory-format defaults rest on measurements.

``bench_train_step`` times the CAE's full training step (forward, MSE, backward, Adam) on random
inputs for several (precision, channels_last) settings side by side; ``cxrcae bench`` can call it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cxrcae.progress import ProgressFn, no_progress

DEFAULT_SETTINGS: tuple[tuple[str, bool], ...] = (("fp32", False), ("fp32", True), ("bf16", True))


def bench_train_step(
    image_size: int = 224,
    batch_size: int = 16,
    steps: int = 5,
    warmup: int = 2,
    settings: Sequence[tuple[str, bool]] = DEFAULT_SETTINGS,
    device: str = "auto",
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> list[dict[str, Any]]:
    """One row per (precision, channels_last): median step seconds, images/s and speed-up vs the first row.

    Each setting gets a freshly seeded model and optimizer and ``warmup`` untimed steps (oneDNN picks
    kernels on the first calls). A setting the device cannot run (e.g. fp16 on CPU) gets an ``error``.
    """
    import torch
    import torch.nn.functional as F

    from cxrcae.errors import CxrcaeError
    from cxrcae.models import CAEDecoder, CAEEncoder, ConvAutoencoder
    from cxrcae.runtime import autocast, resolve_device, resolve_precision

    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    for precision, channels_last in settings:
        row: dict[str, Any] = {
            "precision": precision,
            "channels_last": channels_last,
            "image_size": image_size,
            "batch_size": batch_size,
            "device": str(dev),
        }
        try:
            dtype = resolve_precision(precision, dev)
        except CxrcaeError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        torch.manual_seed(seed)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = ConvAutoencoder(CAEEncoder(), CAEDecoder()).to(dev, memory_format=memory_format).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(batch_size, 3, image_size, image_size, device=dev).contiguous(
            memory_format=memory_format
        )
        task = f"{precision} {'NHWC' if channels_last else 'NCHW'}"
        times = []
        for i in range(warmup + steps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            with autocast(dev, dtype):
                out = model(x)
            loss = F.mse_loss(out.float(), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            progress(task, i + 1, warmup + steps)
        times.sort()
        median = times[len(times) // 2]
        rows.append({**row, "step_s": median, "images_per_s": batch_size / median, "loss": loss.item()})
    base = next((r["images_per_s"] for r in rows if "images_per_s" in r), None)
    for r in rows:
        if "images_per_s" in r and base:
            r["speedup"] = r["images_per_s"] / base
    return rows
