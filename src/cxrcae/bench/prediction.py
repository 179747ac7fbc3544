"""Prediction rows: ``predict`` end to end per backend beside decoding alone; each fast path's agreement."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cxrcae.bench.workloads import CLASS_NAMES
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import resolve_checkpoint
from cxrcae.infer.onnx import export_onnx
from cxrcae.infer.prediction import iter_predictions
from cxrcae.infer.quantize import agreement, quantize_onnx
from cxrcae.io import find_images, load_for_model
from cxrcae.models.checkpoint import read_config, save_checkpoint
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import precision_name, resolve_device, resolve_precision
from cxrcae.tasks import build_model

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


def _untrained_classifier(folder: Path, image_size: int) -> Path:
    """An untrained LSTM-head classifier of ``image_size`` saved in ``folder`` (speed needs no training)."""
    config = {
        "kind": "classifier",
        "head": "lstm",
        "image_size": image_size,
        "class_names": list(CLASS_NAMES),
        "resize_mode": "stretch",
    }
    save_checkpoint(build_model(config), folder, config)
    return folder
