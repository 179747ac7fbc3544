"""Options and rendering shared by ``cxrcae pretrain`` and ``cxrcae finetune`` (not a command itself)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from cxrcae.cli.common import DEFAULT_WORKERS_TEXT, comma_list, console, err_console, make_table, print_json

PANEL = "Training"
RUNTIME = "Runtime"

OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Run folder to create (best/, last/, history.csv, plots).")
]
ImageSizeOpt = Annotated[
    int, typer.Option("--image-size", min=32, help="Square input size in pixels, a multiple of 32.")
]
BatchSizeOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        help="Images per optimiser step, per process: under torchrun N processes step on N x this many.",
    ),
]
LimitBatchesOpt = Annotated[
    int | None,
    typer.Option("--limit-batches", min=1, help="At most N train and N val batches per epoch (smoke runs)."),
]
ChannelsLastOpt = Annotated[
    bool | None,
    typer.Option(
        "--channels-last/--no-channels-last",
        help="NHWC memory format for the convolutions.",
        show_default="whichever this machine's speed probe measured faster (kept in $CXRCAE_HOME/probe)",
        rich_help_panel=RUNTIME,
    ),
]
TrainWorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--num-workers",
        min=0,
        help="DataLoader worker processes.",
        show_default=DEFAULT_WORKERS_TEXT,
        rich_help_panel=RUNTIME,
    ),
]
AugmentOpt = Annotated[
    bool,
    typer.Option(
        "--augment/--no-augment",
        help="Light augmentation: rotation +-5 deg, shift 5%, scale +-5%, brightness/contrast +-10%.",
    ),
]
CacheDecodedOpt = Annotated[
    bool,
    typer.Option(
        "--cache-decoded/--no-cache-decoded",
        help="Decode each image once into $CXRCAE_HOME/decoded (resized) so later epochs skip decoding.",
        rich_help_panel=RUNTIME,
    ),
]
OptimizerOpt = Annotated[
    str,
    typer.Option(
        "--optimizer",
        help="Optimiser of every stage: adam (the paper's), adamw (decoupled weight decay) or sgd "
        "(Nesterov momentum 0.9).",
    ),
]
WeightDecayOpt = Annotated[
    float, typer.Option("--weight-decay", min=0.0, help="Weight decay of the optimiser (0: none).")
]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        help="Continue the interrupted run in this folder with its saved data and settings "
        "(only --device and --num-workers may change).",
    ),
]


# command options whose config field has another name
_RENAMED = {"bootstrap": "n_bootstrap"}


def config_from_options(cls: type, options: dict[str, Any]) -> Any:
    """The core's config dataclass filled from a command's options, matched by name.

    One mapping for ``pretrain``, ``finetune`` and ``reproduce``: options that are not fields (DATA, --out,
    --json, ...) are left out, ``--num-workers`` gets its default, ``--stages``, ``--masks`` and
    ``--label-columns`` tuples and ``--encoder none`` becomes no encoder.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {_RENAMED.get(k, k): v for k, v in options.items()}
    values = {k: v for k, v in values.items() if k in fields}
    if "num_workers" in values:
        from cxrcae.runtime import default_workers

        values["num_workers"] = default_workers(values["num_workers"])
    for name in ("stages", "masks", "label_columns"):
        if isinstance(values.get(name), str):
            values[name] = tuple(comma_list(values[name], what=f"--{name.replace('_', '-')}"))
    for name in ("masks", "label_columns"):
        if name in values and values[name] is None:
            values[name] = ()
    if isinstance(values.get("encoder"), str) and values["encoder"].strip().lower() == "none":
        values["encoder"] = None
    return cls(**values)


def require_data_and_out(data: Path | None, out: Path | None, resume: Path | None) -> None:
    if resume is not None:
        return
    if data is None:
        raise typer.BadParameter("DATA is required (unless --resume is given)", param_hint="DATA")
    if out is None:
        raise typer.BadParameter("--out is required (unless --resume is given)", param_hint="--out")


_SHORT = {"val_accuracy": "val acc", "val_balanced_accuracy": "val bal. acc", "val_macro_f1": "val macro F1"}
_MAX_METRIC_COLUMNS = 3


def _metric_columns(history: list[dict[str, Any]]) -> list[str]:
    """The task's first validation metrics in the history (classify: accuracy, balanced accuracy, macro F1;
    segment: mean Dice, then Dice per structure), at most three, in the order the task reports them."""
    keys: dict[str, None] = {}
    for row in history:
        keys.update(
            dict.fromkeys(k for k in row if k.startswith("val_") and k not in ("val_loss", "val_mse"))
        )
    return list(keys)[:_MAX_METRIC_COLUMNS]


def render_result(result: Any, *, json_out: bool, quiet: bool) -> None:
    """``--json``: the whole result; otherwise the history table, the best epoch and where files went."""
    data = result.to_dict()
    if json_out:
        print_json(data)
        return
    for path in data["skipped_files"][:5]:
        err_console.print(f"[yellow]Skipped unreadable file:[/] {path}", highlight=False, soft_wrap=True)
    if len(data["skipped_files"]) > 5:
        err_console.print(f"[yellow]... and {len(data['skipped_files']) - 5} more (see --json)[/]")
    for note in data["notes"]:
        err_console.print(f"[yellow]Note:[/] {note}", highlight=False, soft_wrap=True)
    if quiet:
        return
    history = data["history"]
    shown = _metric_columns(history)
    columns = ["epoch", "stage", "lr", "train loss", "val loss"]
    columns += [_SHORT.get(k, k.removeprefix("val_").replace("_", " ")) for k in shown]
    columns += ["s", "img/s", "best"]
    rows = []
    for row in history:
        cells = [row["epoch"], row["stage"], f"{row['lr']:g}", row["train_loss"], row["val_loss"]]
        cells += [row.get(k) for k in shown]
        cells += [f"{row['seconds']:.1f}", f"{row['images_per_s']:.1f}", "*" if row["best"] else ""]
        rows.append(cells)
    title = f"{data['task']}: {data['train_images']} train / {data['val_images']} val images"
    title += f" on {data['device']} ({data['precision']})"
    console.print(make_table(title, columns, rows))
    best = data["best_epoch"]
    line = f"Best epoch {best}: val loss {data['best_val_loss']:.5f}" if best else "No epoch finished"
    metrics = {k: v for k, v in data["best_metrics"].items() if k not in ("val_loss", "val_mse")}
    line += "".join(f", {k.removeprefix('val_').replace('_', ' ')} {v:.3f}" for k, v in metrics.items())
    if data.get("baseline"):
        line += f" (mean-image baseline {data['baseline']['val_mse_mean_image']:.5f})"
    console.print(line, highlight=False)
    console.print(f"Model: {data['best_dir']}   Run folder: {data['out_dir']}   ({data['seconds']:.0f} s)")
