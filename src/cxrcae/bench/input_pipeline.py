"""Input-pipeline rows: CAE training through the real loader, cold then warm decoded cache."""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cxrcae.bench.flops import train_flops
from cxrcae.bench.timing import device_sync
from cxrcae.bench.training import DEFAULT_SETTINGS, setting_row
from cxrcae.bench.workloads import train_model, training_objective, training_optimizer
from cxrcae.data import XrayDataset
from cxrcae.errors import CxrcaeError
from cxrcae.io.decoded import DecodedCache
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import resolve_device, resolve_precision
from cxrcae.train.config import PretrainConfig
from cxrcae.train.data import epoch_seed, make_loader, pretrain_data
from cxrcae.train.engine import Runtime, train_one_epoch

PIPELINE_TASK = "pretrain-epoch"
PIPELINE_MODEL = "pretrain"  # the training task whose step the pipeline feeds


def bench_pipeline(
    data: str | Path,
    image_size: int = 224,
    batch_size: int = 16,
    settings: Sequence[tuple[str, bool]] = DEFAULT_SETTINGS,
    device: str = "auto",
    steps: int | None = None,
    num_workers: int = 0,
    in_memory: dict[tuple[str, bool], float] | None = None,
    seed: int = 0,
    resize_mode: str = PretrainConfig.resize_mode,
    progress: ProgressFn = no_progress,
) -> list[dict[str, Any]]:
    """CAE training steps through the real input pipeline on the files of ``data``: two rows per setting,
    ``cache`` ``cold`` then ``warm``.

    The images are the training split of ``data`` as ``cxrcae pretrain`` makes it (``pretrain_data``); the
    batches come from ``XrayDataset`` over a ``DecodedCache`` in a fresh temporary folder (one per setting)
    and ``make_loader`` (shuffled, ``num_workers`` workers, pinned memory on CUDA), and the training
    engine's ``train_one_epoch`` runs the steps on a freshly seeded CAE with the objective and optimiser of
    ``bench_train_step`` (``workloads``). ``steps`` batches per pass (None: a full epoch). The cold pass
    decodes every file and fills the cache (the files themselves may already sit in the OS page cache);
    the warm pass replays the same batches (same loader seed), so it reads only cached arrays, as
    every epoch after the first does. Each pass is timed from the loader's start to its last step
    (synchronised), so worker start-up counts, as it does in every epoch.

    Each row has ``images``, ``seconds``, ``images_per_s``, ``gflops`` and, where ``in_memory`` gives the
    in-memory step rate of the same (precision, channels_last) at the same image and batch size (the
    ``pretrain`` rows of ``bench_train_step``), ``in_memory_images_per_s`` and ``pipeline_fraction`` =
    this pass's images/s over it.
    """

    dev = resolve_device(device)
    in_memory = in_memory or {}
    flop = train_flops(PIPELINE_MODEL, image_size).train
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxrcae-bench-") as tmp:
        records = pretrain_data(data, Path(tmp), PretrainConfig.val_fraction, seed).train
        for precision, channels_last in settings:
            row = setting_row(PIPELINE_TASK, precision, channels_last, image_size, batch_size, dev)
            row["num_workers"] = num_workers
            try:
                dtype = resolve_precision(precision, dev)
            except CxrcaeError as exc:
                rows += [{**row, "cache": cache, "error": str(exc)} for cache in ("cold", "warm")]
                continue
            label = f"{PIPELINE_TASK} {precision} {'NHWC' if channels_last else 'NCHW'}"
            with tempfile.TemporaryDirectory(prefix="decoded-", dir=tmp) as cache_dir:
                passes = _time_pipeline(
                    records, Runtime(dev, dtype, channels_last), DecodedCache(cache_dir), image_size,
                    resize_mode, batch_size, steps, num_workers, seed, label, progress,
                )  # fmt: skip
            reference = in_memory.get((precision, channels_last))
            for cache, (images, seconds, loss, skipped) in zip(("cold", "warm"), passes):
                speed = images / seconds
                result = {
                    **row,
                    "cache": cache,
                    "images": images,
                    "skipped": skipped,
                    "seconds": seconds,
                    "images_per_s": speed,
                    "loss": loss,
                    "train_gflop": flop / 1e9,
                    "gflops": speed * flop / 1e9,
                }
                if reference:
                    result["in_memory_images_per_s"] = reference
                    result["pipeline_fraction"] = speed / reference
                rows.append(result)
    return rows


def _time_pipeline(
    records,
    rt: Runtime,
    decoded: DecodedCache,
    image_size: int,
    resize_mode: str,
    batch_size: int,
    steps: int | None,
    num_workers: int,
    seed: int,
    label: str,
    progress: ProgressFn,
) -> list[tuple[int, float, float, int]]:
    """(images, seconds, mean loss, unreadable files) of the cold pass and of the warm pass."""
    torch.manual_seed(seed)
    model = rt.prepare(train_model(PIPELINE_MODEL, image_size))
    objective, optimizer = training_objective(PIPELINE_MODEL), training_optimizer(model)
    dataset = XrayDataset(records, image_size, resize_mode, [], decoded=decoded)
    loader = make_loader(
        dataset,
        batch_size,
        shuffle=True,
        seed=seed,
        num_workers=num_workers,
        pin_memory=rt.device.type == "cuda",
    )
    n = min(len(loader), steps) if steps else len(loader)
    sync = device_sync(rt.device)
    passes = []
    for cache in ("cold", "warm"):
        loader.generator.manual_seed(epoch_seed(seed, 1))  # the same batches: the warm pass reads the cache
        task = f"{label} {cache}"
        sync()
        start = time.perf_counter()
        stats = train_one_epoch(
            model, itertools.islice(loader, n), objective, optimizer, rt, where=f"{task} pass",
            total=n, progress=progress, task=task,
        )  # fmt: skip
        sync()
        passes.append((stats.images, time.perf_counter() - start, stats.loss, len(stats.skipped)))
    return passes
