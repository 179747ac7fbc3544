"""``run_bench``: the whole benchmark (our rows, the Keras peer's, the ratios) in one run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrcae.bench.input_pipeline import bench_pipeline
from cxrcae.bench.keras_peer import MIN_RUNS, KerasPeer, keras_reference
from cxrcae.bench.prediction import PREDICT_BACKENDS, bench_predict
from cxrcae.bench.report import BenchReport, add_ratios
from cxrcae.bench.training import DEFAULT_SETTINGS, bench_train_step
from cxrcae.bench.workloads import TRAIN_TASKS
from cxrcae.errors import CxrcaeError
from cxrcae.hub.resolve import resolve_checkpoint
from cxrcae.models.checkpoint import read_config
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import default_workers


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
    keras_runs: int = MIN_RUNS,
) -> BenchReport:
    """Time each training ``task`` in each setting and, with ``predict`` files, prediction; each beside the
    Keras peer when ``keras_python`` and ``keras_script`` are given, so the ratios come from one run.

    The peer (``KerasPeer``) runs ``keras_runs`` times per task (at least ``MIN_RUNS``: TensorFlow's speed
    changes from run to run), keeping every run's figure in its row (``keras_runs``) and the best for the
    ratios. It trains in fp32 with the same image size, batch size and step count (``finetune-frozen`` is
    its ``finetune --frozen``), and predicts each ``predict`` folder with ``predict_batch_size``, half of
    its runs before ours and half after.

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
    peer = (
        KerasPeer(keras_python, keras_script, keras_runs, keras_reference)
        if keras_python is not None and keras_script is not None
        else None
    )

    rows: list[dict[str, Any]] = []
    for task in tasks:
        ours = bench_train_step(
            image_size, batch_size, steps, warmup, settings, device, task=task, progress=progress
        )
        rows += [{"impl": "cxrcae", **r} for r in ours]
        if peer is not None:
            rows.append(peer.train_row(task, image_size, batch_size, steps, progress))
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
        early, late = peer.split_runs() if peer is not None else (0, 0)
        before = peer.predict_runs(predict, size, predict_batch_size, early) if peer is not None else []
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
        after = peer.predict_runs(predict, size, predict_batch_size, late) if peer is not None else []
        rows += [KerasPeer.predict_row(first + second, size) for first, second in zip(before, after)]
    add_ratios(rows)
    return BenchReport(rows)
