"""``cxrcae predict``: a model over files, folders, globs; table, CSV/JSON/JSONL rows, exit 3 on bad files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import (
    DeviceOpt,
    InferenceBatchOpt,
    JsonOpt,
    MeasuredWorkersOpt,
    PrecisionOpt,
    QuietOpt,
    console,
    err_console,
    make_table,
    print_json,
)
from cxrcae.errors import EXIT_SOME_FAILED


class Backend(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"
    onnxruntime_int8 = "onnxruntime-int8"


@app.command("predict")
def predict_command(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or globs.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Fine-tuned checkpoint folder or Hub id user/repo@rev (rev optional).",
            show_default="bundled default model",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write every row to a .csv, .json or .jsonl file.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted --output run: rows kept in OUTPUT.partial for unchanged files "
            "(same path, size and mtime) are reused, the others computed.",
        ),
    ] = False,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", min=1, help="Keep the k most likely classes per row (classifiers)."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="Below this top probability the label is 'uncertain' (classifiers).",
        ),
    ] = None,
    explain: Annotated[
        Path | None,
        typer.Option(
            "--explain", help="Write a Grad-CAM overlay PNG per image into this folder (classifiers)."
        ),
    ] = None,
    files: Annotated[
        Path | None,
        typer.Option(
            "--files",
            help="Write the files the model's task makes per image (masks, overlays) into this folder; "
            "a classifier makes none.",
        ),
    ] = None,
    batch_size: InferenceBatchOpt = 32,
    num_workers: MeasuredWorkersOpt = None,
    recursive: Annotated[
        bool, typer.Option("--recursive/--no-recursive", help="Search folders recursively.")
    ] = True,
    show: Annotated[
        int, typer.Option("--show", min=0, help="Rows shown in the terminal table (all go to --output).")
    ] = 50,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    backend: Annotated[
        Backend,
        typer.Option(
            "--backend",
            help="torch, or (classifiers) onnxruntime (CPU, fp32; uses MODEL/model.onnx from `cxrcae export "
            "--onnx`, "
            "exported on the fly when absent; no --explain), or onnxruntime-int8 (CPU, int8; needs "
            "`cxrcae export --onnx --int8 --calibrate DATA`; refused unless it agrees with fp32).",
        ),
    ] = Backend.torch,
    force_int8: Annotated[
        bool,
        typer.Option(
            "--force-int8",
            help="Use an int8 model whose recorded agreement with fp32 misses the bar (>= 99.5% top-1 on "
            ">= 200 images, probabilities within 0.02).",
        ),
    ] = False,
    ood: Annotated[
        bool,
        typer.Option(
            "--ood/--no-ood",
            help="Screen inputs: refuse non-chest DICOMs; label lateral, coloured, blank or unfamiliar "
            "images (reconstruction error above the model's OOD guard) 'uncertain'. --no-ood classifies "
            "everything.",
        ),
    ] = True,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a fine-tuned model over chest X-rays (preprocessing is read from the checkpoint).

    One row per file, in input order: what the model's task answers (a classifier: label and class
    probabilities). Unreadable files become error rows and the run goes on.
    Out-of-distribution inputs are flagged (a classifier's label 'uncertain', reason in the row) or, for
    DICOMs that are not chest radiographs, refused (no answer); see --no-ood.
    Exit codes: 0 = every file answered (predicted, flagged or refused); 3 = some files could not be read
    (see their rows); 1 = nothing could run (bad model, no inputs).
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.infer.predict_run import run_predict

    if output is None and resume:
        raise typer.BadParameter("continues an --output run; give that --output", param_hint="--resume")
    with progress_bar(quiet or json_out) as progress:
        result = run_predict(
            paths,
            model,
            output=output,
            resume=resume,
            keep=None if json_out else show,
            batch_size=batch_size,
            num_workers=num_workers,  # None: chosen by timing the first batch
            device=device,
            precision=precision,
            top_k=top_k,
            threshold=threshold,
            explain_dir=explain,
            files_dir=files,
            recursive=recursive,
            backend=backend.value,
            ood=ood,
            force_int8=force_int8,
            progress=progress,
        )
    if json_out:
        print_json([p.to_dict() for p in result.rows])
    elif not quiet:
        _render(result)
        for note in result.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    if result.errors:
        if not json_out:
            err_console.print(
                f"[yellow]{len(result.errors)} of {result.total} file(s) could not be read[/] "
                f"(exit code {EXIT_SOME_FAILED}).",
                highlight=False,
            )
        raise typer.Exit(EXIT_SOME_FAILED)


def _render(result) -> None:
    answered = [(p, result.display(p)) for p in result.rows if p.ok]
    keys = [k for k in (answered[0][1] if answered else {"prediction": ""}) if k != "note"]
    rows = []
    for p in result.rows:
        if p.ok:
            cells = result.display(p)
            note = str(cells.get("note", ""))
            if p.out_of_distribution:
                note = "; ".join(x for x in (f"[yellow]out of distribution:[/] {p.ood_reason}", note) if x)
            rows.append([Path(p.path).name, *(cells.get(k, "") for k in keys), note])
        else:
            style = {"error": "red", "refused": "yellow"}.get(p.status, "dim")
            rows.append([Path(p.path).name, f"[{style}]{p.status}[/]", *([""] * (len(keys) - 1)), p.reason])
    console.print(make_table(f"Predictions ({result.total} file(s))", ["file", *keys, "note"], rows))
    if result.total > len(result.rows):
        more = f"; all rows in {result.output}" if result.output else "; use --output to save all of them"
        console.print(f"... {result.total - len(result.rows)} more row(s) not shown{more}", highlight=False)
    console.print(result.summary(), highlight=False)
    if result.output:
        console.print(f"Wrote {result.output}", highlight=False)
    if result.explain_dir:
        console.print(f"Grad-CAM overlays in {result.explain_dir}", highlight=False)
    if result.files_dir:
        console.print(f"Files per image in {result.files_dir}", highlight=False)
