"""``cxrcae export``: a classifier as an ONNX file, checked against PyTorch with onnxruntime."""

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
            help="Classifier checkpoint folder or Hub id user/repo[@rev].",
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
            help="Also compare onnxruntime with PyTorch on these images (file, folder or glob; repeatable).",
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a classifier for onnxruntime; `cxrcae predict --backend onnxruntime` then uses it.

    The file is run with onnxruntime next to PyTorch (random images, plus --check images) and written only
    when the logits agree within 1e-3; the checkpoint's class names, image size, preprocessing, temperature
    and weights sha256 are stored in its metadata, so predict refuses an .onnx from another checkpoint.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.infer.onnx import export_onnx

    if not onnx:
        raise typer.BadParameter("missing; ONNX is the one export format so far", param_hint="--onnx")
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
    if result.check_failures and not json_out:
        for path, reason in result.check_failures[:_LISTED]:
            err_console.print(f"  [yellow]not checked[/] {path}: {reason}", highlight=False, soft_wrap=True)
        if len(result.check_failures) > _LISTED:
            err_console.print(f"  ... and {len(result.check_failures) - _LISTED} more", highlight=False)
