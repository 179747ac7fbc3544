"""Training-step rows: the engine's own step (``train_one_epoch``) on an in-memory batch, per setting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cxrcae.allocator import keep_freed_memory
from cxrcae.allocator import status as allocator_status
from cxrcae.bench.flops import train_flops
from cxrcae.bench.timing import device_sync, median_seconds
from cxrcae.bench.workloads import (
    CLASS_NAMES,
    check_task,
    train_model,
    training_objective,
    training_optimizer,
)
from cxrcae.errors import CxrcaeError
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, resolve_device, resolve_precision
from cxrcae.train.engine import Runtime, train_one_epoch

DEFAULT_SETTINGS: tuple[tuple[str, bool], ...] = (("fp32", False), ("fp32", True), ("bf16", True))


def bench_train_step(
    image_size: int = 224,
    batch_size: int = 16,
    steps: int = 5,
    warmup: int = 2,
    settings: Sequence[tuple[str, bool]] = DEFAULT_SETTINGS,
    device: str = "auto",
    seed: int = 0,
    task: str = "pretrain",
    progress: ProgressFn = no_progress,
) -> list[dict[str, Any]]:
    """One row per (precision, channels_last): median step seconds, images/s and speed-up vs the first row.

    ``task``: ``pretrain`` (CAE, MSE), ``finetune-frozen`` (head stage: encoder frozen and in eval mode) or
    ``finetune`` (everything trains). Each setting gets a freshly seeded model and optimiser
    (``workloads``), and each timed step is one call of the training engine's ``train_one_epoch`` on one
    in-memory batch of random images: the step ``cxrcae pretrain`` / ``finetune`` run, NaN check included.
    A setting the device cannot run (e.g. fp16 on CPU) gets an ``error``.

    Arithmetic rate (``count_flops``): ``train_gflop`` and ``forward_gflop`` are the FLOPs of one image's
    training step and forward pass (in GFLOP), ``gflops`` the step's rate (images/s x ``train_gflop``).
    After the steps the same model's forward pass alone is timed in the same setting, under
    ``torch.inference_mode`` in eval mode with the same batch (one extra timed measurement, same
    warmup/steps): ``forward_images_per_s``, its rate ``forward_gflops``, and ``forward_fraction`` =
    ``gflops / forward_gflops``.
    """
    check_task(task)
    dev = resolve_device(device)
    flops = train_flops(task, image_size)
    keep_freed_memory()  # as the training commands do (cxrcae.allocator); CXRCAE_ALLOCATOR=system: without
    rows: list[dict[str, Any]] = []
    for precision, channels_last in settings:
        row = setting_row(task, precision, channels_last, image_size, batch_size, dev)
        row["allocator"] = allocator_status()
        try:
            dtype = resolve_precision(precision, dev)
        except CxrcaeError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        label = f"{task} {precision} {'NHWC' if channels_last else 'NCHW'}"
        seconds, loss, forward_s = _time_train_step(
            task, image_size, batch_size, Runtime(dev, dtype, channels_last), seed, warmup, steps, label,
            progress,
        )  # fmt: skip
        speed, forward_speed = batch_size / seconds, batch_size / forward_s
        gflops, forward_gflops = speed * flops.train / 1e9, forward_speed * flops.forward / 1e9
        rows.append(
            {
                **row,
                "step_s": seconds,
                "images_per_s": speed,
                "loss": loss,
                "train_gflop": flops.train / 1e9,
                "forward_gflop": flops.forward / 1e9,
                "gflops": gflops,
                "forward_s": forward_s,
                "forward_images_per_s": forward_speed,
                "forward_gflops": forward_gflops,
                "forward_fraction": gflops / forward_gflops,
            }
        )
    base = next((r["images_per_s"] for r in rows if "images_per_s" in r), None)
    for r in rows:
        if "images_per_s" in r and base:
            r["speedup"] = r["images_per_s"] / base
    return rows


def setting_row(
    task: str, precision: str, channels_last: bool, image_size: int, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """The fields that name one measured setting (training and input-pipeline rows)."""
    return {
        "task": task,
        "precision": precision,
        "channels_last": channels_last,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": str(device),
    }


def _time_train_step(
    task: str,
    image_size: int,
    batch_size: int,
    rt: Runtime,
    seed: int,
    warmup: int,
    steps: int,
    label: str,
    progress: ProgressFn,
) -> tuple[float, float, float]:
    """Median seconds of one training step of ``task`` on random data, the last step's loss, then the
    median seconds of the same model's forward pass alone on the same batch (eval mode, inference mode)."""
    torch.manual_seed(seed)
    model = rt.prepare(train_model(task, image_size))
    objective, optimizer = training_objective(task), training_optimizer(model)
    images = torch.rand(batch_size, 3, image_size, image_size, device=rt.device)
    batch = {
        "image": images.contiguous(memory_format=torch.channels_last) if rt.channels_last else images,
        "label": torch.randint(0, len(CLASS_NAMES), (batch_size,), device=rt.device),
    }
    last = {"loss": float("nan")}

    def step() -> None:
        stats = train_one_epoch(model, (batch,), objective, optimizer, rt, where=f"bench {label}")
        last["loss"] = stats.loss

    sync = device_sync(rt.device)
    step_s = median_seconds(step, warmup, steps, sync, lambda done, total: progress(label, done, total))
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), autocast(rt.device, rt.dtype):
            model(batch["image"])

    def report(done: int, total: int) -> None:
        progress(f"{label} forward", done, total)

    return step_s, last["loss"], median_seconds(forward, warmup, steps, sync, report)
