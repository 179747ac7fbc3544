"""``cxrcae export``: a classifier as an ONNX file, checked against PyTorch with onnxruntime; with --int8,
its int8 graph with the measured agreement with fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import JsonOpt, QuietOpt, console, err_console, make_table, print_json

_LISTED = 5


@app.command("export")
def export_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Classifier checkpoint folder or Hub id user/repo@rev (rev optional).",
            show_default="bundled default model",
        ),
    ] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the one format so far).")] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The .onnx file to write (a folder means FOLDER/model.onnx).",
            show_default="MODEL/model.onnx for a local checkpoint folder",
        ),
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version (13 to 20).")] = 17,
    check: Annotated[
        list[str] | None,
        typer.Option(
            "--check",
            help="Also compare onnxruntime with PyTorch on these images (file, folder, glob or, with --int8, "
            "a manifest CSV; repeatable). With --int8 the agreement is measured on them.",
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Write the int8 graph (MODEL/model.int8.onnx, or the cache for read-only models) for "
            "`predict --backend onnxruntime-int8`, with its agreement with fp32 (model.int8.agreement.json).",
        ),
    ] = False,
    calibrate: Annotated[
        list[str] | None,
        typer.Option(
            "--calibrate",
            help="Training images for --int8 (folder, manifest CSV, files or globs; repeatable): a sample "
            "calibrates the int8 ranges, others (unless --check) measure the agreement.",
        ),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option("--calibration-images", min=1, help="Images used to calibrate (--int8).")
    ] = 200,
    agreement_images: Annotated[
        int,
        typer.Option(
            "--agreement-images", min=1, help="Held-out images to measure agreement on (--int8, no --check)."
        ),
    ] = 500,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a classifier for onnxruntime; `cxrcae predict --backend onnxruntime` then uses it.

    The file is run with onnxruntime next to PyTorch (random images, plus --check images) and written only
    when the logits agree within 1e-3; the checkpoint's class names, image size, preprocessing, temperature
    and weights sha256 are stored in its metadata, so predict refuses an .onnx from another checkpoint.

    --int8 --calibrate DATA writes the int8 graph instead, with its top-1 agreement and largest probability
    difference against fp32; predict uses it only when they meet the bar (>= 99.5% on >= 200 images, <= 0.02).
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.infer.onnx import export_onnx

    if not onnx:
        raise typer.BadParameter("missing; ONNX is the one export format so far", param_hint="--onnx")
    if int8:
        if not calibrate:
            raise typer.BadParameter("--int8 needs training images to calibrate on", param_hint="--calibrate")
        _export_int8(
            model, output, opset, calibrate, check, calibration_images, agreement_images, json_out, quiet
        )
        return
    if calibrate:
        raise typer.BadParameter("only used with --int8", param_hint="--calibrate")
    with progress_bar(quiet or json_out) as progress:
        result = export_onnx(model, output, opset=opset, check_images=check or None, progress=progress)
    if json_out:
        print_json(result.to_dict())
    elif not quiet:
        size = int(result.image_size)
        rows = [
            ["file", str(result.path)],
            ["size", f"{result.size_bytes / 1e6:.1f} MB"],
            ["opset", result.opset],
            ["input", f"image: float32 (batch, 3, {size}, {size}) in [0, 1]"],
            ["output", f"logits: {', '.join(result.class_names)}"],
            ["max |diff| logits", f"{result.max_abs_diff_logits:.2e}"],
            ["max |diff| probabilities", f"{result.max_abs_diff_probabilities:.2e}"],
            ["images checked", f"{result.images_checked} real + {result.random_checked} random"],
        ]
        console.print(make_table("ONNX export (onnxruntime vs PyTorch)", ["", "value"], rows))
    _list_failures(result.check_failures, json_out)


def _list_failures(failures, json_out: bool) -> None:
    if failures and not json_out:
        for path, reason in failures[:_LISTED]:
            err_console.print(f"  [yellow]not checked[/] {path}: {reason}", highlight=False, soft_wrap=True)
        if len(failures) > _LISTED:
            err_console.print(f"  ... and {len(failures) - _LISTED} more", highlight=False)


def _export_int8(
    model, output, opset, calibrate, check, calibration_images, agreement_images, json_out, quiet
):
    from cxrcae.cli.common import progress_bar
    from cxrcae.infer.quantize import AGREEMENT_BAR, quantize_onnx

    with progress_bar(quiet or json_out) as progress:
        result = quantize_onnx(
            model,
            output,
            calibrate=calibrate,
            check_images=check or None,
            calibration_images=calibration_images,
            agreement_images=agreement_images,
            opset=opset,
            progress=progress,
        )
    if json_out:
        print_json(result.to_dict())
    elif not quiet:
        found = result.agreement
        rows = [
            ["file", str(result.path)],
            ["size", f"{result.size_bytes / 1e6:.1f} MB"],
            ["calibration images", result.calibration_images],
            ["kept in fp32", ", ".join(result.fp32_layers) or "nothing (all convolutions int8)"],
            [f"agreement images ({result.agreement_source})", found.images],
            ["top-1 agreement", f"{found.top1:.2%} (bar >= {AGREEMENT_BAR['min_top1']:.1%})"],
            [
                "max |diff| probabilities",
                f"{found.max_prob_diff:.4f} (bar <= {AGREEMENT_BAR['max_prob_diff']})",
            ],
            ["figures", str(result.agreement_path)],
        ]
        console.print(make_table("int8 export (onnxruntime int8 vs PyTorch fp32)", ["", "value"], rows))
        if result.meets_bar:
            console.print("Meets the bar: `cxrcae predict --backend onnxruntime-int8` will use it.")
        else:
            need = AGREEMENT_BAR["min_images"]
            why = (
                f"only {found.images} agreement images (needs {need})"
                if found.within_bar
                else "below the bar"
            )
            err_console.print(
                f"[yellow]{why}:[/] `predict --backend onnxruntime-int8` refuses it unless --force-int8",
                highlight=False,
            )
    _list_failures(result.check_failures, json_out)
