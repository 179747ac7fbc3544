"""Benchmarks: figures for the training steps and for prediction, optionally beside the Keras reference.

Speed is never asserted in tests (these machines are noisy); it is measured here and compared as ratios taken
side by side in one run. ``run_bench`` is the whole benchmark (ours, the Keras peer, the ratios) and
``cxrcae bench`` prints its rows. The Keras peer is the paper's own models in TensorFlow
(``keras_reference.py``), run in the Python that has TensorFlow installed.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import resolve_checkpoint
from cxrcae.infer.prediction import iter_predictions
from cxrcae.io import find_images, load_for_model
from cxrcae.models import CAEDecoder, CAEEncoder, ConvAutoencoder, CXRClassifier, build_head, build_model
from cxrcae.models.checkpoint import read_config, save_checkpoint
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, resolve_device, resolve_precision
from cxrcae.train.finetuning import apply_stage

DEFAULT_SETTINGS: tuple[tuple[str, bool], ...] = (("fp32", False), ("fp32", True), ("bf16", True))
TRAIN_TASKS = ("pretrain", "finetune-frozen", "finetune")


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
    """

    if task not in TRAIN_TASKS:
        raise CxrcaeError(f"unknown benchmark task {task!r}; use one of {', '.join(TRAIN_TASKS)}")
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    for precision, channels_last in settings:
        row: dict[str, Any] = {
            "task": task,
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
        label = f"{task} {precision} {'NHWC' if channels_last else 'NCHW'}"
        seconds, loss = _time_train_step(
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
        )
        rows.append({**row, "step_s": seconds, "images_per_s": batch_size / seconds, "loss": loss})
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
) -> tuple[float, float]:
    """Median seconds of one optimiser step of ``task`` on random data, and the last loss."""

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

    return _median_seconds(step, warmup, steps, _sync(dev), report), last["loss"]


def _sync(dev) -> Callable[[], None]:

    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def bench_predict(
    inputs: Sequence[str | Path],
    model: str | Path | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    progress: ProgressFn = no_progress,
) -> list[dict[str, Any]]:
    """End-to-end ``predict`` (decode, resize, forward) beside decoding alone, on the same files.

    Without ``model`` an untrained LSTM-head classifier of ``image_size`` is used: throughput does not
    depend on the weights.
    """

    files, _ = find_images(inputs)
    if not files:
        raise CxrcaeError(f"no images found in {', '.join(map(str, inputs))}")
    with tempfile.TemporaryDirectory(prefix="cxrcae-bench-") as tmp:
        ref = model if model is not None else _untrained_classifier(Path(tmp) / "model", image_size)

        config = read_config(resolve_checkpoint(ref))
        size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")

        start = time.perf_counter()
        for i, path in enumerate(files):
            load_for_model(path, size, mode)
            progress("decode only", i + 1, len(files))
        decode_s = time.perf_counter() - start

        # one untimed batch so model loading and kernel selection are not counted
        for _ in iter_predictions(files[:1], ref, batch_size=1, device=device, precision=precision):
            pass
        start = time.perf_counter()
        ok = 0
        for i, pred in enumerate(
            iter_predictions(
                files, ref, batch_size=batch_size, num_workers=num_workers, device=device, precision=precision
            )
        ):
            ok += pred.ok
            progress("predict", i + 1, len(files))
        predict_s = time.perf_counter() - start
    common = {"images": len(files), "image_size": size, "batch_size": batch_size, "num_workers": num_workers}
    return [
        {"task": "decode only", **common, "seconds": decode_s, "images_per_s": len(files) / decode_s},
        {"task": "predict", **common, "seconds": predict_s, "images_per_s": len(files) / predict_s, "ok": ok},
    ]


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
) -> BenchReport:
    """Time each training ``task`` in each setting and, with ``predict`` files, prediction; each beside the
    Keras peer when ``keras_python`` and ``keras_script`` are given, so the ratios come from one run.

    The peer trains in fp32 with the same image size, batch size and step count (``finetune-frozen`` is its
    ``finetune --frozen``) and predicts each ``predict`` folder with ``predict_batch_size``.
    """

    tasks = list(tasks)
    bad = [t for t in tasks if t not in TRAIN_TASKS]
    if bad:
        raise CxrcaeError(f"unknown benchmark task(s) {', '.join(bad)}; use {', '.join(TRAIN_TASKS)}")
    if (keras_python is None) != (keras_script is None):
        raise CxrcaeError("the Keras peer needs both a Python with TensorFlow and keras_reference.py")
    peer_cmd = (keras_python, keras_script) if keras_python is not None and keras_script is not None else None

    rows: list[dict[str, Any]] = []
    for task in tasks:
        ours = bench_train_step(
            image_size, batch_size, steps, warmup, settings, device, task=task, progress=progress
        )
        rows += [{"impl": "cxrcae", **r} for r in ours]
        if peer_cmd is not None:
            progress(f"{task} keras", 0, 1)
            peer = keras_reference(*peer_cmd, *_keras_train_args(task, image_size, batch_size, steps))
            progress(f"{task} keras", 1, 1)
            rows.append(
                {
                    "impl": "keras",
                    "task": task,
                    "precision": "fp32",
                    "images_per_s": peer["images_per_s"],
                    "image_size": image_size,
                    "batch_size": batch_size,
                    "tf": peer.get("tf"),
                }
            )
    if predict:
        ours = bench_predict(predict, None, image_size, predict_batch_size, device=device, progress=progress)
        rows += [{"impl": "cxrcae", **r} for r in ours]
        if peer_cmd is not None:
            for folder in predict:
                peer = keras_reference(
                    *peer_cmd,
                    "predict",
                    str(folder),
                    "--size",
                    str(image_size),
                    "--batch",
                    str(predict_batch_size),
                )
                rows.append(
                    {
                        "impl": "keras",
                        "task": "predict",
                        "images_per_s": peer["images_per_s"],
                        "images": peer.get("images"),
                        "image_size": image_size,
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
