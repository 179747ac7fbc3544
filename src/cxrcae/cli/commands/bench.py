"""``cxrcae bench``: speed of training steps and prediction, optionally beside the Keras reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import DeviceOpt, JsonOpt, QuietOpt, console, make_table, print_json

SETTINGS = {
    "fp32:nchw": ("fp32", False),
    "fp32:nhwc": ("fp32", True),
    "bf16:nhwc": ("bf16", True),
    "bf16:nchw": ("bf16", False),
    "fp16:nhwc": ("fp16", True),
}


@app.command("bench")
def bench_command(
    tasks: Annotated[
        str, typer.Option("--tasks", help="Comma-separated: pretrain, finetune-frozen, finetune.")
    ] = "pretrain,finetune-frozen,finetune",
    predict: Annotated[
        list[Path] | None,
        typer.Option("--predict", help="Also time `predict` (and decoding alone) on these files/folders."),
    ] = None,
    image_size: Annotated[
        int, typer.Option("--image-size", min=32, help="Input size (multiple of 32).")
    ] = 224,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Training batch size.")] = 16,
    predict_batch_size: Annotated[
        int, typer.Option("--predict-batch-size", min=1, help="Images per --predict forward pass.")
    ] = 32,
    predict_model: Annotated[
        str | None,
        typer.Option(
            "--predict-model",
            help="Classifier to time --predict with (folder or Hub id); Keras then predicts at its size.",
            show_default="an untrained classifier of --image-size",
        ),
    ] = None,
    predict_backends: Annotated[
        str,
        typer.Option("--predict-backends", help="Comma-separated predict backends to time side by side."),
    ] = "torch,onnxruntime,onnxruntime-int8",
    predict_ood: Annotated[
        bool,
        typer.Option(
            "--predict-ood/--predict-no-ood",
            help="Time predict with its out-of-distribution screen (its default) or without (as Keras).",
        ),
    ] = True,
    calibrate: Annotated[
        list[str] | None,
        typer.Option(
            "--calibrate",
            help="Images to calibrate the onnxruntime-int8 graph on (folder, manifest CSV, globs).",
            show_default="the --predict files",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per setting (median).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 2,
    settings: Annotated[
        str, typer.Option("--settings", help=f"precision:layout pairs to compare: {', '.join(SETTINGS)}.")
    ] = "fp32:nchw,fp32:nhwc,bf16:nhwc",
    keras_python: Annotated[
        Path | None, typer.Option("--keras-python", help="A Python with TensorFlow, to run the Keras peer.")
    ] = None,
    keras_script: Annotated[
        Path | None, typer.Option("--keras-script", help="Path of keras_reference.py (the paper's models).")
    ] = None,
    keras_runs: Annotated[
        int,
        typer.Option(
            "--keras-runs",
            min=4,
            help="Runs of the Keras peer per task (TensorFlow's speed changes from run to run); each is "
            "listed, the best is compared.",
        ),
    ] = 4,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Real images (folder or manifest): also train the CAE through the input pipeline "
            "(task pretrain-epoch, cold then warm decoded cache), as a fraction of the in-memory rate.",
        ),
    ] = None,
    data_steps: Annotated[
        int | None,
        typer.Option("--data-steps", min=1, help="Batches per --data pass.", show_default="a full epoch"),
    ] = None,
    num_workers: Annotated[
        int | None,
        typer.Option(
            "--num-workers",
            min=0,
            help="DataLoader workers of the --data passes and of --predict (decoding).",
            show_default="as training (CPUs-2, max 4) and as predict (measured on the first batch)",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Images/s of the training steps and of prediction; ratios are taken side by side in this one run.

    Each training row also gives its GFLOP/s beside the GFLOP/s of the same model's forward pass alone in
    the same setting (% of fwd); with --data, the pretrain-epoch rows give the pipeline's images/s as a
    fraction of the in-memory pretrain rate of the same setting. --predict times each --predict-backends
    entry through `predict` (decoding workers: --num-workers) and gives each fast path's agreement with
    the torch row on the same files (top-1 agreement, largest probability difference; * = short of the
    bar: >= 99.5% on >= 200 files, <= 0.02). The Keras peer runs --keras-runs times per task: its row
    lists every run's images/s and the ratios use the best.
    """
    from cxrcae.bench import PREDICT_BACKENDS, TRAIN_TASKS, run_bench
    from cxrcae.cli.common import comma_list, path_arg, progress_bar

    task_list = list(comma_list(tasks, what="--tasks", choices=TRAIN_TASKS))
    pairs = [SETTINGS[s] for s in comma_list(settings.lower(), what="--settings", choices=SETTINGS)]
    if (keras_python is None) != (keras_script is None):
        raise typer.BadParameter("give both --keras-python and --keras-script", param_hint="--keras-python")
    backend_list = list(comma_list(predict_backends, what="--predict-backends", choices=PREDICT_BACKENDS))
    if not backend_list:
        raise typer.BadParameter(
            f"use some of {', '.join(PREDICT_BACKENDS)}", param_hint="--predict-backends"
        )

    with progress_bar(quiet or json_out) as progress:
        report = run_bench(
            task_list,
            image_size,
            batch_size,
            steps,
            warmup,
            pairs,
            predict=predict,
            predict_batch_size=predict_batch_size,
            device=device,
            keras_python=keras_python,
            keras_script=keras_script,
            progress=progress,
            data=path_arg(data) if data is not None else None,
            data_steps=data_steps,
            num_workers=num_workers,
            predict_model=predict_model,
            predict_backends=backend_list,
            calibrate=calibrate or None,
            predict_ood=predict_ood,
            keras_runs=keras_runs,
        )
    if json_out:
        print_json(report.rows)
    elif not quiet:
        _render(report.rows)


def _render(rows: list[dict[str, Any]]) -> None:
    peer_runs = any("keras_runs" in r for r in rows)
    table_rows = []
    for r in rows:
        layout = "" if "channels_last" not in r else ("NHWC" if r["channels_last"] else "NCHW")
        screen = "no OOD screen" if r.get("ood") is False else ""
        setting = " ".join(x for x in (r.get("backend", ""), r.get("precision", ""), layout, screen) if x)
        speed = r.get("images_per_s")
        task = f"{r['task']} ({r['cache']})" if "cache" in r else r["task"]
        table_rows.append(
            [
                task,
                r["impl"],
                setting,
                f"{speed:.2f}" if speed else r.get("error", ""),
                _num(r.get("gflops"), "{:.1f}"),
                _num(r.get("forward_gflops"), "{:.1f}"),
                _num(r.get("forward_fraction"), "{:.0%}"),
                _num(r.get("pipeline_fraction"), "{:.0%}"),
                _agreement(r),
                f"{r['vs_keras']:.2f}x" if "vs_keras" in r else "",
            ]
            + ([", ".join(f"{x:.2f}" for x in r.get("keras_runs", []))] if peer_runs else [])
        )
    console.print(
        make_table(
            "Benchmark (images/s, median of timed steps; pipeline passes: whole pass)",
            [
                "task",
                "impl",
                "setting",
                "images/s",
                "GFLOP/s",
                "fwd GFLOP/s",
                "% of fwd",
                "pipeline/in-mem",
                "vs fp32 (top-1, max dp)",
                "vs keras",
            ]
            + (["keras runs (images/s; best kept)"] if peer_runs else []),
            table_rows,
        )
    )


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _agreement(row: dict[str, Any]) -> str:
    """A fast path's agreement with the torch row of the same files; * marks one short of the bar."""
    if "top1_agreement" not in row:
        return ""
    mark = "" if row.get("meets_bar") else "*"
    return f"{row['top1_agreement']:.1%}, {row['max_prob_diff']:.3f}{mark}"
