"""``cxrcae transfer``: should I start from this encoder? Encoders x labelled fractions x modes, paired."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cxrcae.cli.app import app
from cxrcae.cli.commands._training import (
    ImageSizeOpt,
    LimitBatchesOpt,
    TrainWorkersOpt,
    config_from_options,
)
from cxrcae.cli.common import (
    DeviceOpt,
    JsonOpt,
    PrecisionOpt,
    QuietOpt,
    SeedOpt,
    comma_list,
    console,
    err_console,
    print_json,
)

TARGETS = "Targets (default: class labels)"
BUDGET = "Fine-tuning budget"


@app.command("transfer")
def transfer_command(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Argument(
            help="Labelled data: class folders, a manifest CSV (with --labels / --label-columns / --masks "
            "for other tasks) or a splits CSV. A 'split' column is used as it is; else a patient-grouped "
            "split is made."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Study folder (rerun the same command to continue).")
    ],
    encoders: Annotated[
        str,
        typer.Option(
            "--encoders",
            help="Comma-separated encoders, the first the reference: bundled, random, a checkpoint folder or "
            "Hub id, timm:NAME or timm:NAME:WEIGHTS_FILE, imagenet-lite0 (ImageNet EfficientNet-Lite0; "
            "needs the imagenet extra).",
        ),
    ] = "bundled,random",
    fractions: Annotated[
        str,
        typer.Option(
            "--fractions", help="Labelled shares of the training patients, comma-separated (nested, seeded)."
        ),
    ] = "1",
    modes: Annotated[
        str,
        typer.Option(
            "--modes",
            help="probe (linear probe on frozen features), finetune (the task's training), or both.",
        ),
    ] = "probe,finetune",
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="classify, multilabel or segment.",
            show_default="from the options: --masks segment, --labels multilabel, else classify",
            rich_help_panel=TARGETS,
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Multi-label: one column of separated names (e.g. finding).",
            rich_help_panel=TARGETS,
        ),
    ] = None,
    label_sep: Annotated[
        str | None,
        typer.Option(
            "--label-sep",
            help="Separator of --labels names (e.g. /).",
            show_default="|",
            rich_help_panel=TARGETS,
        ),
    ] = None,
    label_columns: Annotated[
        str | None,
        typer.Option("--label-columns", help="Multi-label: 0/1 columns A,B,C.", rich_help_panel=TARGETS),
    ] = None,
    masks: Annotated[
        str | None,
        typer.Option(
            "--masks", help="Segmentation: mask-path columns, one per structure.", rich_help_panel=TARGETS
        ),
    ] = None,
    image_size: ImageSizeOpt = 224,
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Maximum epochs per stage.", rich_help_panel=BUDGET)
    ] = 20,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per step.", rich_help_panel=BUDGET)
    ] = 16,
    stages: Annotated[
        str,
        typer.Option(
            "--stages", help="Fine-tuning stages (head,all is the paper's).", rich_help_panel=BUDGET
        ),
    ] = "all",
    lrs: Annotated[
        str,
        typer.Option(
            "--lrs",
            help="Learning rates of the trained encoder layers; with several, validation loss picks one.",
            rich_help_panel=BUDGET,
        ),
    ] = "1e-4",
    head: Annotated[
        str,
        typer.Option(
            "--head", help="Classifier head: lstm, lstm3, lstm-dense3, dense5.", rich_help_panel=BUDGET
        ),
    ] = "lstm",
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=1, help="Bootstrap resamples for the CIs and the pairing.")
    ] = 1000,
    limit_batches: LimitBatchesOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    num_workers: TrainWorkersOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Should I start from this encoder? Each encoder x labelled fraction x mode on one split, seed and
    budget, paired with the first encoder on the same test patients.

    Writes OUT/transfer.json, transfer.csv, comparisons.csv and transfer.png (the label-efficiency curve).
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.study import TransferConfig, run_transfer

    options = dict(ctx.params)
    options["encoders"] = tuple(comma_list(encoders, what="--encoders"))
    options["modes"] = tuple(comma_list(modes, what="--modes"))
    options["fractions"] = tuple(comma_list(fractions, float, "--fractions"))
    options["lrs"] = tuple(comma_list(lrs, float, "--lrs"))
    options["label_columns"] = tuple(comma_list(label_columns or "", what="--label-columns"))
    options["masks"] = tuple(comma_list(masks or "", what="--masks"))
    cfg = config_from_options(TransferConfig, options)
    with progress_bar(quiet or json_out) as progress:
        result = run_transfer(data, out, cfg, progress)
    if json_out:
        print_json(result.to_dict())
        return
    for note in result.notes:
        err_console.print(f"[yellow]Note:[/] {note}", highlight=False, soft_wrap=True)
    if not quiet:
        _render(result)


def _render(result: Any) -> None:
    from rich import box
    from rich.table import Table

    metric = result.metric
    label = {a["name"]: a["label"] for a in result.arms}
    diffs = {}
    for point in result.points:
        for name, comp in point["comparisons"].items():
            diffs[(point["fraction"], name.split("-vs-")[0])] = comp.get(metric) or {}
    table = Table(
        box=box.SIMPLE_HEAD,
        header_style="bold",
        pad_edge=False,
        title=f"Test {metric.replace('_', ' ')} (95% CI) and paired difference from the first encoder",
    )
    table.add_column("labels", no_wrap=True)
    table.add_column("encoder", overflow="fold", min_width=8)
    table.add_column("mode", no_wrap=True)
    table.add_column(metric.replace("_", " "), justify="right", no_wrap=True)
    table.add_column("difference", justify="right", no_wrap=True)
    for point in result.points:
        for name, arm in point["arms"].items():
            test, diff = arm["test"], diffs.get((point["fraction"], name))
            table.add_row(
                f"{point['fraction']:.0%} ({point['train_images']})",
                label.get(name, name),
                arm["mode"],
                _with_ci(test.get(metric), test.get(f"{metric}_ci"), ""),
                "reference" if diff is None else _with_ci(diff.get("difference"), diff.get("ci"), "+"),
            )
    console.print(table)
    console.print(
        f"Study folder: {result.out_dir}  (transfer.json, transfer.csv, comparisons.csv, transfer.png)"
    )


def _with_ci(value: float | None, ci: list | None, sign: str) -> str:
    if value is None:
        return "n/a"
    text = f"{value:{sign}.3f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:{sign}.2f}, {ci[1]:{sign}.2f}]"
    return text
