"""``cxrcae predict``: classify files, folders and globs; table, CSV/JSON/JSONL rows, exit 3 on bad files."""

from __future__ import annotations

from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

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
            help="Classifier checkpoint folder or Hub id user/repo@rev (rev optional).",
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
        int | None, typer.Option("--top-k", min=1, help="Keep the k most likely classes per row.")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold", min=0.0, max=1.0, help="Below this top probability the label is 'uncertain'."
        ),
    ] = None,
    explain: Annotated[
        Path | None,
        typer.Option("--explain", help="Write a Grad-CAM overlay PNG per image into this folder."),
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
            help="torch, or onnxruntime (CPU, fp32; uses MODEL/model.onnx from `cxrcae export --onnx`, "
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
    """Classify chest X-rays with a fine-tuned model (preprocessing is read from the checkpoint).

    One row per file, in input order. Unreadable files become error rows and the run goes on.
    Out-of-distribution inputs are flagged (label 'uncertain', reason in the row) or, for DICOMs that are
    not chest radiographs, refused (no class); see --no-ood.
    Exit codes: 0 = every file answered (classified, flagged or refused); 3 = some files could not be read
    (see their rows); 1 = nothing could run (bad model, no inputs).
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.errors import CxrcaeError
    from cxrcae.infer.prediction import iter_predictions, model_folder
    from cxrcae.infer.writers import PredictionWriter, RowJournal, locked_output, output_format
    from cxrcae.models.checkpoint import read_config
    from cxrcae.ood.guard import has_guard

    if output is not None:
        output_format(output)  # fail before any work on a bad extension
    elif resume:
        raise typer.BadParameter("continues an --output run; give that --output", param_hint="--resume")
    counts = {"ok": 0, "error": 0, "skipped": 0, "refused": 0, "flagged": 0}
    shown: list[Any] = []
    errors: list[Any] = []
    rows_json: list[dict] = []
    folder = model_folder(model)  # resolved once: the bundled default or a Hub id become a folder here
    model_config = read_config(folder)
    class_names = list(model_config.get("class_names", []))
    with progress_bar(quiet or json_out) as progress, ExitStack() as stack:
        writer = None
        journal = None
        if output is not None:  # one writer per output file; finished rows kept for --resume
            stack.enter_context(locked_output(output))
            settings = {"model": model_config.get("weights_sha256"), "top_k": top_k, "threshold": threshold}
            settings |= {"explain": explain, "device": device, "precision": precision}
            settings |= {"backend": backend.value, "ood": ood}
            journal = stack.enter_context(RowJournal(output, settings, resume=resume))
        stream = iter_predictions(
            paths,
            folder,
            batch_size=batch_size,
            num_workers=num_workers,  # None: chosen by timing the first batch
            device=device,
            precision=precision,
            top_k=top_k,
            threshold=threshold,
            explain_dir=explain,
            recursive=recursive,
            backend=backend.value,
            ood=ood,
            progress=progress,
            force_int8=force_int8,
            reuse=journal.saved_row if journal is not None else None,
        )
        for pred in stream:
            counts[pred.status] += 1
            counts["flagged"] += pred.status == "ok" and bool(pred.out_of_distribution)
            if pred.status == "error":
                errors.append(pred)
            if json_out:
                rows_json.append(pred.to_dict())
            elif len(shown) < show:
                shown.append(pred)
            if output is not None:
                if writer is None:  # opened on the first row: no output file when there is nothing to write
                    writer = stack.enter_context(PredictionWriter(output, class_names, journal))
                writer.write(pred.to_dict())
    total = sum(n for status, n in counts.items() if status != "flagged")  # flagged rows are also "ok"
    if total == 0:
        raise CxrcaeError(f"no files found in {', '.join(paths)}")

    if json_out:
        print_json(rows_json)
    elif not quiet:
        _render(shown, total, counts, output, explain, top_k)
        if ood and not has_guard(folder, model_config):
            console.print(
                "[yellow]note:[/] this model has no OOD guard (ood.safetensors): only the DICOM header, "
                "colour and blank-image checks ran; fit one with `cxrcae calibrate-ood MODEL DATA`",
                highlight=False,
            )
    if errors:
        if not json_out:
            err_console.print(
                f"[yellow]{len(errors)} of {total} file(s) could not be read[/] "
                f"(exit code {EXIT_SOME_FAILED}).",
                highlight=False,
            )
        raise typer.Exit(EXIT_SOME_FAILED)


def _render(shown, total, counts, output, explain, top_k) -> None:
    names: list[str] = next((list(p.probabilities) for p in shown if p.probabilities), [])
    columns = ["file", "prediction", *names, "note"]
    rows = []
    for p in shown:
        if p.status == "ok":
            note = ", ".join(f"{n} {v:.2f}" for n, v in p.top_k) if top_k else ""
            if p.out_of_distribution:
                note = "; ".join(x for x in (f"[yellow]out of distribution:[/] {p.ood_reason}", note) if x)
            label = p.label if p.label == p.top_class else f"{p.label} ({p.top_class})"
            rows.append([Path(p.path).name, label, *(p.probabilities[n] for n in names), note])
        else:
            style = {"error": "red", "refused": "yellow"}.get(p.status, "dim")
            rows.append([Path(p.path).name, f"[{style}]{p.status}[/]", *([""] * len(names)), p.reason])
    console.print(make_table(f"Predictions ({total} file(s))", columns, rows))
    if total > len(shown):
        more = f"; all rows in {output}" if output else "; use --output to save all of them"
        console.print(f"... {total - len(shown)} more row(s) not shown{more}", highlight=False)
    summary = (
        f"{counts['ok']} classified, {counts['error']} unreadable, {counts['skipped']} skipped (not images)"
    )
    if counts["flagged"] or counts["refused"]:
        summary += (
            f"; {counts['flagged']} of the classified flagged out of distribution (label 'uncertain'), "
            f"{counts['refused']} refused (not a chest radiograph)"
        )
    console.print(summary, highlight=False)
    if output:
        console.print(f"Wrote {output}", highlight=False)
    if explain:
        console.print(f"Grad-CAM overlays in {explain}", highlight=False)
