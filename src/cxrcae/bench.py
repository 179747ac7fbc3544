"""Benchmarks: figures for the training steps and for prediction, optionally beside the Keras reference.

Speed is never asserted in tests (these machines are noisy); it is measured here and compared as ratios taken
side by side in one run. ``run_bench`` is the whole benchmark (ours, the Keras peer, the ratios) and
``cxrcae bench`` prints its rows. The Keras peer is the paper's own models in TensorFlow
(``keras_reference.py``), run in the Python that has TensorFlow installed.

Two more yardsticks come from the same run:

* arithmetic rate: ``count_flops`` counts the multiply-adds of a model's convolutions, LSTMs and dense
  layers for one image, so each training row has its GFLOP/s (``gflops``) beside the GFLOP/s the same
  model's forward pass alone reaches in the same setting (``forward_gflops``; their ratio is
  ``forward_fraction``): how close a training step comes to what a forward convolution reaches here;
* input pipeline: with real files (``data``), ``bench_pipeline`` trains the CAE through the real loader
  (``XrayDataset`` + ``make_loader`` + ``train_one_epoch``, decoded cache in a temporary folder) and gives
  each pass's images/s as a fraction of the in-memory step rate of the same setting (``pipeline_fraction``).

Memory: ``bench_predict_memory`` runs ``cxrcae predict --output`` in a fresh process on the first 100 and
the first 2,000 of the given files and reports each run's peak resident memory (the kernel's ``ru_maxrss``
of that process and the workers it waited for): streaming keeps it flat, whatever the number of files.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrcae.allocator import keep_freed_memory
from cxrcae.allocator import status as allocator_status
from cxrcae.data import XrayDataset
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import resolve_checkpoint
from cxrcae.infer.onnx import export_onnx
from cxrcae.infer.prediction import iter_predictions
from cxrcae.infer.quantize import agreement, quantize_onnx
from cxrcae.io import find_images, load_for_model
from cxrcae.io.decoded import DecodedCache
from cxrcae.models import CAEDecoder, CAEEncoder, ConvAutoencoder, CXRClassifier, build_head, build_model
from cxrcae.models.checkpoint import read_config, save_checkpoint
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, default_workers, precision_name, resolve_device, resolve_precision
from cxrcae.train.config import PretrainConfig
from cxrcae.train.data import epoch_seed, make_loader, pretrain_data
from cxrcae.train.engine import Runtime, train_one_epoch
from cxrcae.train.finetuning import apply_stage

DEFAULT_SETTINGS: tuple[tuple[str, bool], ...] = (("fp32", False), ("fp32", True), ("bf16", True))
TRAIN_TASKS = ("pretrain", "finetune-frozen", "finetune")
PIPELINE_TASK = "pretrain-epoch"


def _median_seconds(
    step: Callable[[], Any], warmup: int, steps: int, sync: Callable[[], None], report
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


def _train_model(task: str, image_size: int):
    """The model and loss of one training step of ``task``, as the training loop builds them."""

    if task == "pretrain":
        return ConvAutoencoder(CAEEncoder(), CAEDecoder()), lambda out, x, y: F.mse_loss(out.float(), x)
    model = CXRClassifier(CAEEncoder(), build_head("lstm", 3, image_size))
    if task == "finetune-frozen":
        apply_stage(model, "head")
    return model, lambda out, x, y: F.cross_entropy(out.float(), y)


# ----------------------------------------------------------------------------------------------- FLOPs

COUNTED_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.LSTM)


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs (2 x multiply-adds) of one layer for one image: its forward pass and the two backward products.

    A layer's backward pass costs one forward's worth of multiply-adds for the weight gradient and one for
    the gradient of its input, so a layer that gets both costs 3x its forward in a training step. Each is
    counted only when autograd computes it: ``weight_grad`` is 0 for a frozen layer, ``input_grad`` is 0
    when the layer's input needs no gradient (the first convolution's input is the image; a frozen encoder
    hands its head features that need none). An LSTM always back-propagates through time once any gradient
    flows through it, so only the input projection's share of its input gradient can be skipped.
    """

    name: str
    kind: str
    forward: int
    weight_grad: int
    input_grad: int

    @property
    def train(self) -> int:
        return self.forward + self.weight_grad + self.input_grad


@dataclass(frozen=True)
class FlopCount:
    """Per-image FLOPs of a model's ``COUNTED_LAYERS`` at one input size (see ``count_flops``)."""

    image_size: int
    layers: tuple[LayerFlops, ...]

    @property
    def forward(self) -> int:
        """FLOPs of one forward pass of one image."""
        return sum(layer.forward for layer in self.layers)

    @property
    def train(self) -> int:
        """FLOPs of one training step per image: forward plus the gradients autograd computes."""
        return sum(layer.train for layer in self.layers)


def count_flops(model: nn.Module, image_size: int, in_chans: int = 3) -> FlopCount:
    """FLOPs (2 x multiply-adds) of ``model``'s convolutions, transposed convolutions, LSTMs and dense
    layers for one ``in_chans`` x ``image_size`` x ``image_size`` image, forward and training step.

    Shapes come from forward hooks on a copy of the model on the ``meta`` device (nothing is computed or
    allocated), and whether each gradient is needed from ``requires_grad`` as autograd sees it there, so
    frozen parameters (``apply_stage``) count as they train: forward only. Per image, with ``k`` the kernel
    size: a convolution costs H_out*W_out*C_out*(C_in/groups)*k*k multiply-adds, a transposed convolution
    H_in*W_in*C_in*(C_out/groups)*k*k (every input pixel is spread over a k x k window; PyTorch computes
    the full window even where Keras geometry crops the border), a dense layer in*out per row, an LSTM
    T*4H*(I+H) per layer and direction over T steps. Biases, activations, pooling, the loss and the
    optimizer update are not counted (well under 1% of the total for these models).
    """
    meta = copy.deepcopy(model).to("meta")
    found: list[LayerFlops] = []  # in call order; a layer called twice is counted twice
    names = {id(m): name for name, m in meta.named_modules()}

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0]
        trains = any(p.requires_grad for p in module.parameters(recurse=False))
        macs, in_part = _layer_macs(module, x, output[0] if isinstance(output, tuple) else output)
        if isinstance(module, nn.LSTM):
            flows = trains or x.requires_grad  # then the gradient runs back through time
            input_macs = ((macs - in_part) + (in_part if x.requires_grad else 0)) if flows else 0
        else:
            input_macs = macs if x.requires_grad else 0
        kind = next(c.__name__ for c in COUNTED_LAYERS if isinstance(module, c))  # KerasSame... -> base
        found.append(LayerFlops(names[id(module)], kind, 2 * macs, 2 * macs * trains, 2 * input_macs))

    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, COUNTED_LAYERS)]
    try:
        with torch.enable_grad():
            meta(torch.empty(1, in_chans, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return FlopCount(image_size, tuple(found))


def _layer_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """Multiply-adds of ``module`` on a batch of one, and (LSTMs) the share of its input projections."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw, 0
    if isinstance(module, nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        return x.numel() * (module.out_channels // module.groups) * kh * kw, 0
    if isinstance(module, nn.Linear):
        return (x.numel() // module.in_features) * module.in_features * module.out_features, 0
    assert isinstance(module, nn.LSTM)
    steps = x.shape[1] if module.batch_first else x.shape[0]
    dirs = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    total = in_part = 0
    for layer in range(module.num_layers):
        size_in = module.input_size if layer == 0 else hidden * dirs
        total += dirs * steps * 4 * hidden * (size_in + hidden)
        if layer == 0:
            in_part = dirs * steps * 4 * hidden * size_in
    return total, in_part


def train_flops(task: str, image_size: int) -> FlopCount:
    """``count_flops`` of the model of training ``task`` as ``bench_train_step`` builds it (frozen parts
    included)."""
    return count_flops(_train_model(task, image_size)[0], image_size)


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
    ``finetune`` (everything trains). Each setting gets a freshly seeded model and Adam optimizer; a setting
    the device cannot run (e.g. fp16 on CPU) gets an ``error``.

    Arithmetic rate (``count_flops``): ``train_gflop`` and ``forward_gflop`` are the FLOPs of one image's
    training step and forward pass (in GFLOP), ``gflops`` the step's rate (images/s x ``train_gflop``).
    After the steps the same model's forward pass alone is timed in the same setting, under
    ``torch.inference_mode`` in eval mode with the same batch (one extra timed measurement, same
    warmup/steps): ``forward_images_per_s``, its rate ``forward_gflops``, and ``forward_fraction`` =
    ``gflops / forward_gflops``.
    """

    if task not in TRAIN_TASKS:
        raise CxrcaeError(f"unknown benchmark task {task!r}; use one of {', '.join(TRAIN_TASKS)}")
    dev = resolve_device(device)
    flops = train_flops(task, image_size)
    keep_freed_memory()  # as training does (cxrcae.allocator); CXRCAE_ALLOCATOR=system times without it
    rows: list[dict[str, Any]] = []
    for precision, channels_last in settings:
        row: dict[str, Any] = {
            "task": task,
            "precision": precision,
            "channels_last": channels_last,
            "image_size": image_size,
            "batch_size": batch_size,
            "device": str(dev),
            "allocator": allocator_status(),
        }
        try:
            dtype = resolve_precision(precision, dev)
        except CxrcaeError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        label = f"{task} {precision} {'NHWC' if channels_last else 'NCHW'}"
        seconds, loss, forward_s = _time_train_step(
            task,
            image_size,
            batch_size,
            dev,
            dtype,
            channels_last,
            seed,
            warmup,
            steps,
            lambda done, total, label=label: progress(label, done, total),
            lambda done, total, label=label: progress(f"{label} forward", done, total),
        )
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


def _time_train_step(
    task: str,
    image_size: int,
    batch_size: int,
    dev,
    dtype,
    channels_last: bool,
    seed: int,
    warmup: int,
    steps: int,
    report,
    report_forward,
) -> tuple[float, float, float]:
    """Median seconds of one optimiser step of ``task`` on random data, the last loss, then the median
    seconds of the same model's forward pass alone on the same batch (eval mode, inference mode)."""

    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, loss_fn = _train_model(task, image_size)
    model = model.to(dev, memory_format=fmt).train()
    if task == "finetune-frozen":
        model.encoder.eval()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(batch_size, 3, image_size, image_size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (batch_size,), device=dev)
    last = {"loss": float("nan")}

    def step() -> None:
        with autocast(dev, dtype):
            out = model(x)
        loss = loss_fn(out, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last["loss"] = loss.item()

    sync = _sync(dev)
    step_s = _median_seconds(step, warmup, steps, sync, report)
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), autocast(dev, dtype):
            model(x)

    return step_s, last["loss"], _median_seconds(forward, warmup, steps, sync, report_forward)


def _sync(dev) -> Callable[[], None]:

    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


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
    and ``make_loader`` (shuffled, ``num_workers`` workers, pinned memory on CUDA), and ``train_one_epoch``
    runs the steps on a freshly seeded CAE with Adam. ``steps`` batches per pass (None: a full epoch). The
    cold pass decodes every file and fills the cache (the files themselves may already sit in the OS page
    cache); the warm pass replays the same batches (same loader seed), so it reads only cached arrays, as
    every epoch after the first does. Each pass is timed from the loader's start to its last step
    (synchronised), so worker start-up counts, as it does in every epoch.

    Each row has ``images``, ``seconds``, ``images_per_s``, ``gflops`` and, where ``in_memory`` gives the
    in-memory step rate of the same (precision, channels_last) at the same image and batch size (the
    ``pretrain`` rows of ``bench_train_step``), ``in_memory_images_per_s`` and ``pipeline_fraction`` =
    this pass's images/s over it.
    """

    dev = resolve_device(device)
    in_memory = in_memory or {}
    flop = train_flops("pretrain", image_size).train
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxrcae-bench-") as tmp:
        records = pretrain_data(data, Path(tmp), PretrainConfig.val_fraction, seed).train
        for precision, channels_last in settings:
            row: dict[str, Any] = {
                "task": PIPELINE_TASK,
                "precision": precision,
                "channels_last": channels_last,
                "image_size": image_size,
                "batch_size": batch_size,
                "device": str(dev),
                "num_workers": num_workers,
            }
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
    model = rt.prepare(ConvAutoencoder(CAEEncoder(), CAEDecoder()))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
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
    sync = _sync(rt.device)
    passes = []
    for cache in ("cold", "warm"):
        loader.generator.manual_seed(epoch_seed(seed, 1))  # the same batches: the warm pass reads the cache
        task = f"{label} {cache}"
        sync()
        start = time.perf_counter()
        stats = train_one_epoch(
            model, itertools.islice(loader, n), _reconstruction, optimizer, rt, where=f"{task} pass",
            total=n, progress=progress, task=task,
        )  # fmt: skip
        sync()
        passes.append((stats.images, time.perf_counter() - start, stats.loss, len(stats.skipped)))
    return passes


def _reconstruction(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """The pretraining objective (``engine.Reconstruction`` after its first epoch): MSE in fp32."""
    out = model(images)
    return F.mse_loss(out.float(), images.float()), out


PREDICT_BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "onnxruntime-int8")


def bench_predict(
    inputs: Sequence[str | Path],
    model: str | Path | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: ProgressFn = no_progress,
    backends: Sequence[str] = PREDICT_BACKENDS,
    calibrate: Any = None,
    ood: bool = True,
) -> list[dict[str, Any]]:
    """End-to-end ``predict`` (decode, resize, forward) per backend beside decoding alone, on the same files.

    Without ``model`` an untrained LSTM-head classifier of ``image_size`` is used (throughput does not depend
    on the weights); a given model is copied into a temporary folder first, so the ONNX files the run exports
    never touch it. Each backend is timed through ``iter_predictions`` as ``cxrcae predict`` runs it (model
    loading included, ``num_workers`` decoding workers, None: chosen as predict chooses); ``torch`` is PyTorch
    in fp32 unless ``precision`` says otherwise. ``onnxruntime-int8`` is built first with ``quantize_onnx``,
    calibrated on ``calibrate`` (default: the benchmarked files themselves) and run even when it misses the
    agreement bar, since this measures it. Each non-torch row carries its agreement with the torch row on the
    same files (``top1_agreement``, ``max_prob_diff``, ``meets_bar`` with at least 200 files). ``ood``: the
    out-of-distribution screen predict runs by default (a model with a guard autoencoder runs it on every
    image, in torch, whatever the backend; the Keras peer has no such screen).
    """
    files, _ = find_images(inputs)
    if not files:
        raise CxrcaeError(f"no images found in {', '.join(map(str, inputs))}")
    unknown = [b for b in backends if b not in PREDICT_BACKENDS]
    if unknown:
        raise CxrcaeError(f"unknown backend(s) {', '.join(unknown)}; use {', '.join(PREDICT_BACKENDS)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxrcae-bench-") as tmp:
        folder = Path(tmp) / "model"
        if model is None:
            _untrained_classifier(folder, image_size)
        else:
            shutil.copytree(resolve_checkpoint(model), folder, ignore=shutil.ignore_patterns("*.onnx"))
        config = read_config(folder)
        size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
        common = {
            "images": len(files),
            "image_size": size,
            "batch_size": batch_size,
            "num_workers": "auto" if num_workers is None else num_workers,
        }

        start = time.perf_counter()
        for i, path in enumerate(files):
            load_for_model(path, size, mode)
            progress("decode only", i + 1, len(files))
        decode_s = time.perf_counter() - start
        rows.append(
            {"task": "decode only", **common, "seconds": decode_s, "images_per_s": len(files) / decode_s}
        )

        extra: dict[str, dict[str, Any]] = {}
        if "onnxruntime" in backends:
            export_onnx(folder, progress=progress)
        if "onnxruntime-int8" in backends:
            built = quantize_onnx(folder, calibrate=calibrate or files, progress=progress)
            extra["onnxruntime-int8"] = {
                "fp32_layers": built.fp32_layers,
                "calibration": "the benchmarked files" if calibrate is None else str(calibrate),
            }
        reference = None
        for backend in backends:
            options = {"device": device, "precision": precision} if backend == "torch" else {}
            run = partial(
                iter_predictions, model=folder, backend=backend, force_int8=True, ood=ood, **options
            )
            for _ in run(files[:1], batch_size=1):  # the OS file cache and oneDNN's kernels, untimed
                pass
            start = time.perf_counter()
            preds = []
            for i, pred in enumerate(run(files, batch_size=batch_size, num_workers=num_workers)):
                preds.append(pred)
                progress(f"predict {backend}", i + 1, len(files))
            seconds = time.perf_counter() - start
            row = {
                "task": "predict",
                "backend": backend,
                "precision": _predict_precision(backend, precision, device),
                "ood": ood,
                **common,
                "seconds": seconds,
                "images_per_s": len(files) / seconds,
                "ok": sum(p.ok for p in preds),
                **extra.get(backend, {}),
            }
            probs = _probabilities(preds, config["class_names"])
            if backend == "torch":
                reference = probs
            elif reference is not None:
                found = agreement(*_common_rows(reference, probs))
                row |= {
                    "top1_agreement": found.top1,
                    "max_prob_diff": found.max_prob_diff,
                    "agreement_images": found.images,
                    "meets_bar": found.meets_bar,
                }
            rows.append(row)
    return rows


def _predict_precision(backend: str, precision: str, device: str) -> str:
    if backend == "onnxruntime-int8":
        return "int8"
    if backend == "onnxruntime":
        return "fp32"
    return precision_name(resolve_precision(precision, resolve_device(device)))


def _probabilities(preds, names: Sequence[str]) -> dict[str, list[float]]:
    """Path -> class probabilities of the classified rows."""
    return {p.path: [p.probabilities[n] for n in names] for p in preds if p.ok}


def _common_rows(reference: dict[str, list[float]], probs: dict[str, list[float]]):
    """Two (n, classes) arrays over the paths both runs classified, in one order, and those paths."""
    paths = [p for p in reference if p in probs]

    def as_array(by_path: dict[str, list[float]]) -> np.ndarray:
        return np.array([by_path[p] for p in paths], dtype=np.float64).reshape(len(paths), -1)

    return as_array(reference), as_array(probs), paths


def bench_predict_memory(
    inputs: Sequence[str | Path],
    counts: Sequence[int] = (100, 2000),
    model: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: ProgressFn = no_progress,
) -> list[dict[str, Any]]:
    """Peak RSS of ``cxrcae predict FILES --output preds.csv`` on the first ``n`` files, for each ``n`` in
    ``counts``, each in a fresh process (the bundled model unless ``model``); the last row gives each peak
    as a ratio of the first (flat memory: close to 1)."""
    files, _ = find_images(inputs)
    if len(files) < max(counts):
        raise CxrcaeError(f"need {max(counts)} images for the memory benchmark, found {len(files)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxrcae-bench-") as tmp:
        for i, n in enumerate(counts):
            folder = Path(tmp) / f"inputs{n}"
            folder.mkdir()
            for k, path in enumerate(files[:n]):  # one folder argument, whatever n is
                os.symlink(Path(path).resolve(), folder / f"{k:06d}{Path(path).suffix}")
            cmd = [sys.executable, "-m", "cxrcae", "predict", str(folder), "--output", f"{tmp}/p{n}.csv"]
            cmd += ["--batch-size", str(batch_size), "--num-workers", str(num_workers), "--quiet"]
            cmd += ["--model", str(model)] if model is not None else []
            progress("predict memory", i, len(counts), f"{n} images")
            start = time.perf_counter()
            with open(Path(tmp) / "stderr.txt", "w+b") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
                _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak, not the benchmark's
                proc.returncode = os.waitstatus_to_exitcode(status)
                seconds = time.perf_counter() - start
                err.seek(0)
                error = err.read().decode(errors="replace").strip()
            if proc.returncode not in (0, 3):
                raise CxrcaeError(f"predict failed in the memory benchmark: {error or proc.returncode}")
            peak_mb = usage.ru_maxrss / 1024  # kB on Linux
            row = {"task": "predict-memory", "images": n, "peak_rss_mb": round(peak_mb, 1)}
            rows.append(
                {**row, "seconds": round(seconds, 2), "batch_size": batch_size, "workers": num_workers}
            )
    progress("predict memory", len(counts), len(counts), "")
    base = rows[0]["peak_rss_mb"]
    for row in rows:
        row["vs_first"] = round(row["peak_rss_mb"] / base, 4)
    return rows


def _untrained_classifier(folder: Path, image_size: int) -> Path:

    config = {
        "kind": "classifier",
        "head": "lstm",
        "image_size": image_size,
        "class_names": ["COVID", "NORMAL", "PNEUMONIA"],
        "resize_mode": "stretch",
    }
    save_checkpoint(build_model(config), folder, config)
    return folder


def keras_reference(
    python: str | Path, script: str | Path, task: str, *args: str, timeout: float = 3600
) -> dict[str, Any]:
    """Run ``keras_reference.py TASK ARGS`` in ``python`` (a TensorFlow environment); its JSON line."""
    cmd = [str(python), str(script), task, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CxrcaeError(f"Keras reference could not run ({' '.join(cmd)}): {exc}") from None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CxrcaeError(f"Keras reference failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1])


@dataclass
class BenchReport:
    """The rows of one ``run_bench``, in the order they were measured.

    Each row has ``impl`` (``cxrcae`` or ``keras``) and ``task``. Our rows are those of ``bench_train_step``
    and ``bench_predict``; a Keras row carries the peer's ``images_per_s``. Our rows with a Keras row of the
    same task get ``vs_keras``: our images/s over the peer's (above 1: we are faster).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def keras_figures(self) -> dict[str, float]:
        """The Keras images/s of each task that has a peer row (the last one, when a task has several)."""
        return _keras_figures(self.rows)

    @property
    def comparisons(self) -> list[dict[str, Any]]:
        """Our rows that have a Keras peer: the setting, our figure, the Keras figure and the ratio."""
        peers = self.keras_figures
        return [
            {
                "task": r["task"],
                "precision": r.get("precision"),
                "channels_last": r.get("channels_last"),
                "backend": r.get("backend"),
                "images_per_s": r["images_per_s"],
                "keras_images_per_s": peers[r["task"]],
                "vs_keras": r["vs_keras"],
            }
            for r in self.rows
            if r["impl"] == "cxrcae" and "vs_keras" in r
        ]


def run_bench(
    tasks: Sequence[str] = TRAIN_TASKS,
    image_size: int = 224,
    batch_size: int = 16,
    steps: int = 5,
    warmup: int = 2,
    settings: Sequence[tuple[str, bool]] = DEFAULT_SETTINGS,
    predict: Sequence[str | Path] | None = None,
    predict_batch_size: int = 32,
    device: str = "auto",
    keras_python: str | Path | None = None,
    keras_script: str | Path | None = None,
    progress: ProgressFn = no_progress,
    data: str | Path | None = None,
    data_steps: int | None = None,
    num_workers: int | None = None,
    predict_model: str | Path | None = None,
    predict_backends: Sequence[str] = PREDICT_BACKENDS,
    calibrate: Any = None,
    predict_ood: bool = True,
) -> BenchReport:
    """Time each training ``task`` in each setting and, with ``predict`` files, prediction; each beside the
    Keras peer when ``keras_python`` and ``keras_script`` are given, so the ratios come from one run.

    The peer trains in fp32 with the same image size, batch size and step count (``finetune-frozen`` is its
    ``finetune --frozen``), twice per task, keeping its better figure (``runs_images_per_s`` has both), and
    predicts each ``predict`` folder with ``predict_batch_size``, once before and
    once after ours, keeping its better figure (``runs_images_per_s`` has both).

    Prediction (``bench_predict``) runs each of ``predict_backends`` on ``predict_model`` (an untrained
    classifier of ``image_size`` when None; the peer then predicts at that model's size) with
    ``num_workers`` decoding workers; the int8 graph is calibrated on ``calibrate`` (default: the
    benchmarked files). Each predict row gets its ``vs_keras``; the non-torch rows their agreement with torch.

    With ``data`` (a folder or manifest of real images), ``bench_pipeline`` adds ``pretrain-epoch`` rows
    (cold and warm decoded cache, ``data_steps`` batches per pass or a full epoch, ``num_workers`` loader
    workers) after the training tasks, each with its ``pipeline_fraction`` of the in-memory ``pretrain``
    rate of the same setting; the ``pretrain`` rows are measured for it when ``tasks`` lacks them.
    """

    tasks = list(tasks)
    bad = [t for t in tasks if t not in TRAIN_TASKS]
    if bad:
        raise CxrcaeError(f"unknown benchmark task(s) {', '.join(bad)}; use {', '.join(TRAIN_TASKS)}")
    if (keras_python is None) != (keras_script is None):
        raise CxrcaeError("the Keras peer needs both a Python with TensorFlow and keras_reference.py")
    if data is not None and not Path(data).expanduser().exists():
        raise CxrcaeError(f"{data}: no such file or folder (--data)")
    peer_cmd = (keras_python, keras_script) if keras_python is not None and keras_script is not None else None

    rows: list[dict[str, Any]] = []
    for task in tasks:
        ours = bench_train_step(
            image_size, batch_size, steps, warmup, settings, device, task=task, progress=progress
        )
        rows += [{"impl": "cxrcae", **r} for r in ours]
        if peer_cmd is not None:
            # twice, keeping the better figure (as for predict): a noisy spell can only favour the peer
            runs, peer_args = [], _keras_train_args(task, image_size, batch_size, steps)
            for done in range(2):
                progress(f"{task} keras", done, 2)
                runs.append(keras_reference(*peer_cmd, *peer_args))
            progress(f"{task} keras", 2, 2)
            rows.append(
                {
                    "impl": "keras",
                    "task": task,
                    "precision": "fp32",
                    "images_per_s": max(r["images_per_s"] for r in runs),
                    "runs_images_per_s": [r["images_per_s"] for r in runs],
                    "image_size": image_size,
                    "batch_size": batch_size,
                    "tf": runs[0].get("tf"),
                }
            )
    if data is not None:
        if "pretrain" not in tasks:  # the in-memory reference, measured in this run at the same settings
            ours = bench_train_step(
                image_size, batch_size, steps, warmup, settings, device, task="pretrain", progress=progress
            )
            rows += [{"impl": "cxrcae", **r} for r in ours]
        in_memory = {
            (r["precision"], r["channels_last"]): r["images_per_s"]
            for r in rows
            if r["impl"] == "cxrcae" and r["task"] == "pretrain" and "images_per_s" in r
        }
        ours = bench_pipeline(
            data,
            image_size,
            batch_size,
            settings,
            device,
            data_steps,
            default_workers(num_workers),
            in_memory,
            progress=progress,
        )
        rows += [{"impl": "cxrcae", **r} for r in ours]
    if predict:
        size = (
            image_size
            if predict_model is None
            else read_config(resolve_checkpoint(predict_model))["image_size"]
        )

        def peer_predict() -> list[dict[str, Any]]:
            args = ("--size", str(size), "--batch", str(predict_batch_size))
            return [keras_reference(*peer_cmd, "predict", str(f), *args) for f in predict]

        # the peer runs before and after ours and keeps its better figure: a shared machine's load moves
        # within a minute, and this way a quiet spell can only favour the peer
        before = peer_predict() if peer_cmd is not None else []
        ours = bench_predict(
            predict,
            predict_model,
            image_size,
            predict_batch_size,
            num_workers,
            device=device,
            progress=progress,
            backends=predict_backends,
            calibrate=calibrate,
            ood=predict_ood,
        )
        rows += [{"impl": "cxrcae", **r} for r in ours]
        after = peer_predict() if peer_cmd is not None else []
        for first, second in zip(before, after):
            rows.append(
                {
                    "impl": "keras",
                    "task": "predict",
                    "images_per_s": max(first["images_per_s"], second["images_per_s"]),
                    "runs_images_per_s": [first["images_per_s"], second["images_per_s"]],
                    "images": first.get("images"),
                    "image_size": size,
                }
            )
    _add_ratios(rows)
    return BenchReport(rows)


def _keras_train_args(task: str, image_size: int, batch_size: int, steps: int) -> list[str]:
    """``keras_reference.py`` task and arguments of the peer of our training ``task``."""
    peer_task = "pretrain" if task == "pretrain" else "finetune"
    args = [peer_task, "--size", str(image_size), "--batch", str(batch_size), "--steps", str(steps)]
    if task == "finetune-frozen":
        args.append("--frozen")
    return args


def _keras_figures(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {r["task"]: r["images_per_s"] for r in rows if r["impl"] == "keras"}


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each cxrcae row's speed relative to the Keras row of the same task, when there is one."""
    peers = _keras_figures(rows)
    for r in rows:
        if r["impl"] == "cxrcae" and r.get("images_per_s") and peers.get(r["task"]):
            r["vs_keras"] = r["images_per_s"] / peers[r["task"]]
