"""``cxrcae evaluate``: metrics with 95% CIs, subgroup breakdowns, figures and a report, for any task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import (
    DecodeWorkersOpt,
    DeviceOpt,
    EvalPrecisionOpt,
    InferenceBatchOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    console,
    err_console,
    make_table,
    print_json,
)


@app.command("evaluate")
def evaluate_command(
    model: Annotated[
        str, typer.Argument(help="Fine-tuned checkpoint folder or Hub id user/repo@rev (rev optional).")
    ],
    data: Annotated[
        Path,
        typer.Argument(
            help="Splits CSV (its --split rows are used), or a class folder / manifest without a split "
            "column (all rows, evaluated as an external set)."
        ),
    ],
    split: Annotated[str, typer.Option("--split", help="Which rows of a splits CSV to evaluate.")] = "test",
    by: Annotated[
        list[str] | None,
        typer.Option(
            "--by",
            help="Metrics per subgroup of a manifest column (repeatable): source, view, age:10 (bands of "
            "10), age:18,65 (cut points), source+view (crossed).",
            show_default="source, when the data has sources",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder.", show_default="MODEL_DIR/eval-<split or external>"),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate",
            help="First fit a temperature on the val rows and store it in config.json (classifiers).",
        ),
    ] = False,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95% CIs (0 = none).")
    ] = 1000,
    bins: Annotated[
        int | None,
        typer.Option(
            "--bins",
            min=2,
            help="Confidence bins for ECE / reliability diagram (classifiers).",
            show_default="15",
        ),
    ] = None,
    html: Annotated[
        bool, typer.Option("--html/--no-html", help="Also write a single-file report.html.")
    ] = True,
    batch_size: InferenceBatchOpt = 32,
    num_workers: DecodeWorkersOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: EvalPrecisionOpt = "fp32",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a fine-tuned model with its task's metrics and 95% bootstrap CIs (a classifier: per-class
    and macro/weighted metrics, ECE).

    Patients are resampled when the data has patient ids. Also per-subgroup metrics (--by; per source by
    default) with small subgroups marked, and metrics.json, predictions.csv, PNG figures and report.html in
    the output folder. Data without a split column is an external set.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.eval.evaluation import evaluate
    from cxrcae.runtime import default_workers

    with progress_bar(quiet or json_out) as progress:
        result = evaluate(
            model,
            data,
            split,
            out_dir=out,
            batch_size=batch_size,
            num_workers=default_workers(num_workers),
            device=device,
            precision=precision,
            n_bootstrap=bootstrap,
            seed=seed,
            n_bins=bins,
            calibrate=calibrate,
            by=by,
            html=html,
            progress=progress,
        )
    if json_out:
        print_json(result.metrics)
        return
    for note in result.notes:
        err_console.print(f"[yellow]Note:[/] {note}", highlight=False, soft_wrap=True)
    if quiet:
        return
    render(result)


def render(result) -> None:
    from cxrcae.eval.evaluation import describe_set
    from cxrcae.eval.subgroups import FEW_CLASS_N, SMALL_GROUP_N

    m = result.metrics
    ci = m.get("ci") or {}
    columns, rows = result.table()
    console.print(
        make_table(
            f"{Path(m['model']).name} on {Path(m['data']).name} ({describe_set(m)}, {m['n']} images)",
            columns,
            rows,
        )
    )
    marked = False
    for title, columns, rows in result.subgroup_tables():
        console.print(make_table(title, columns, rows))
        marked = marked or any(row[-1] for row in rows)
    if marked:
        console.print(
            f"marked: fewer than {SMALL_GROUP_N} images, or a class with fewer than {FEW_CLASS_N}; "
            "wide intervals, read as unknown",
            highlight=False,
        )
    if summary := result.summary():
        console.print(" | ".join(f"{name} {text}" for name, text in summary), highlight=False)
    if ci:
        console.print(
            f"95% CIs: {ci['n_resamples']} bootstrap resamples of {ci['n_units']} {ci['unit']}s "
            f"(seed {ci['seed']})",
            highlight=False,
        )
    fit = (m.get("calibration") or {}).get("fit")
    if fit:
        console.print(
            f"Calibrated on {fit['n']} val images: T={fit['temperature']:.3f}, "
            f"NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}, "
            f"ECE {fit['ece_before']:.4f} -> {fit['ece_after']:.4f}; stored in {fit['config']}",
            highlight=False,
        )
    if result.out_dir:
        console.print(
            f"Wrote {result.out_dir}/: " + ", ".join(p.name for p in result.files.values()), highlight=False
        )
