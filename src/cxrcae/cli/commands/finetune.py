"""``cxrcae finetune``: train a classifier on a pretrained encoder with gradual unfreezing (phase 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.commands._training import (
    AugmentOpt,
    BatchSizeOpt,
    CacheDecodedOpt,
    ChannelsLastOpt,
    ImageSizeOpt,
    LimitBatchesOpt,
    OptimizerOpt,
    OutOpt,
    ResumeOpt,
    TrainWorkersOpt,
    WeightDecayOpt,
    config_from_options,
    render_result,
    require_data_and_out,
)
from cxrcae.cli.common import DeviceOpt, JsonOpt, PrecisionOpt, QuietOpt, SeedOpt


def _labelled_task(value: str) -> str:
    """``--task``: a registered task that trains on labels (checked when the command runs, so that
    ``--help`` does not load the task registry and torch)."""
    from cxrcae.tasks import TASKS

    choices = [name for name, task in TASKS.items() if task.labelled]
    if value not in choices:
        raise typer.BadParameter(
            f"{value!r} is not a task that trains on labels; choose {', '.join(choices)}"
        )
    return value


@app.command("finetune")
def finetune_command(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Argument(
            help="A splits CSV from `cxrcae split` (train/val used, test never touched), or a class folder / "
            "manifest split now with the same defaults (written to OUT/splits.csv)."
        ),
    ] = None,
    encoder: Annotated[
        str,
        typer.Option(
            "--encoder",
            help="Pretrained encoder: bundled (the X-ray encoder shipped with cxrcae), a CAE or classifier "
            "checkpoint folder, a Hub id user/repo (or user/repo@rev), or random (also: none) for random "
            "initialisation (the baseline that shows what pretraining buys).",
        ),
    ] = "bundled",
    out: OutOpt = None,
    head: Annotated[
        str, typer.Option("--head", help="Classification head: lstm (proposed), lstm3, lstm-dense3, dense5.")
    ] = "lstm",
    stages: Annotated[
        str,
        typer.Option(
            "--stages",
            help="Unfreezing stages in order: head (encoder frozen), conv6..conv2 (head + encoder blocks "
            "from that one up), all (everything), gradual (= conv6,...,conv2,all). 'all' alone = plain "
            "fine-tuning.",
        ),
    ] = "head,all",
    image_size: ImageSizeOpt = 224,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Maximum epochs per stage.")] = 20,
    batch_size: BatchSizeOpt = 16,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the 'head' stage.")] = 1e-3,
    lr_unfrozen: Annotated[
        float, typer.Option("--lr-unfrozen", help="Adam learning rate of stages that train encoder layers.")
    ] = 1e-5,
    optimizer: OptimizerOpt = "adam",
    weight_decay: WeightDecayOpt = 0.0,
    patience: Annotated[
        int, typer.Option("--patience", min=1, help="Early stopping per stage: epochs without improvement.")
    ] = 5,
    min_delta: Annotated[
        float, typer.Option("--min-delta", min=0.0, help="Early stopping: smallest val loss improvement.")
    ] = 0.0,
    resize_mode: Annotated[
        str, typer.Option("--resize-mode", help="stretch (as the authors' fine-tuning) or pad.")
    ] = "stretch",
    augment: AugmentOpt = False,
    cache_decoded: CacheDecodedOpt = True,
    balance: Annotated[
        str,
        typer.Option(
            "--balance",
            help="Imbalanced classes: none, loss (class-weighted cross-entropy), sampler "
            "(WeightedRandomSampler over classes) or source (over classes, and over sources inside each "
            "class, against the source shortcut).",
        ),
    ] = "none",
    task: Annotated[
        str,
        typer.Option(
            "--task",
            callback=_labelled_task,
            help="What to learn: classify (one label per image, the manifest's label column or class "
            "folders) or segment (one mask per structure: --masks, or images/ + masks/<structure>/ folders).",
        ),
    ] = "classify",
    masks: Annotated[
        str | None,
        typer.Option(
            "--masks",
            help="--task segment: the manifest's mask-path columns, one per structure, comma-separated "
            "(e.g. left_lung,right_lung,heart); relative paths are read from the manifest's folder. "
            "Default: every column of image paths, or every masks/<structure>/ folder.",
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Manifest column of separated label names (with --label-sep)."),
    ] = None,
    label_sep: Annotated[
        str | None, typer.Option("--label-sep", help="Separator of the names in the --labels column, e.g. /.")
    ] = None,
    label_columns: Annotated[
        str | None,
        typer.Option("--label-columns", help="0/1 manifest columns, one per label, comma-separated."),
    ] = None,
    limit_batches: LimitBatchesOpt = None,
    resume: ResumeOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    channels_last: ChannelsLastOpt = None,
    num_workers: TrainWorkersOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a classifier: head first over the frozen encoder (Adam 1e-3), then everything (1e-5).

    Each stage runs up to --epochs with early stopping on validation loss and restores the best weights.
    Writes OUT/best (the classifier), OUT/last (resume state), history.csv and loss_curve.png.
    Interrupted (Ctrl-C, a kill, a full disk)? --resume OUT continues after the last finished epoch and ends
    with the weights an uninterrupted run reaches. One command at a time writes OUT.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.hub.encoders import cae_encoder_ref
    from cxrcae.train import FinetuneConfig, finetune, resume_run
    from cxrcae.train.distributed import current

    require_data_and_out(data, out, resume)
    main = current().main  # under torchrun only rank 0 shows progress and the result
    with progress_bar(quiet or json_out or not main) as progress:
        if resume is not None:
            result = resume_run(resume, progress, task="finetune", device=device, num_workers=num_workers)
        else:
            cfg = config_from_options(FinetuneConfig, {**ctx.params, "encoder": cae_encoder_ref(encoder)})
            result = finetune(data, out, cfg, progress)
    if main:
        render_result(result, json_out=json_out, quiet=quiet)
