"""``cxrcae pretrain``: train the convolutional autoencoder on unlabelled X-rays (the paper's phase 1)."""

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


@app.command("pretrain")
def pretrain_command(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Images: a folder (searched recursively, labels ignored), a manifest or a splits CSV "
            "(its train/val rows; test rows are never used)."
        ),
    ] = None,
    out: OutOpt = None,
    image_size: ImageSizeOpt = 224,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Maximum epochs.")] = 100,
    batch_size: BatchSizeOpt = 64,
    lr: Annotated[
        float,
        typer.Option(
            "--lr",
            help="Adam learning rate. The paper's text says 0.01; the authors' code used 0.001 (default).",
        ),
    ] = 1e-3,
    optimizer: OptimizerOpt = "adam",
    weight_decay: WeightDecayOpt = 0.0,
    patience: Annotated[
        int, typer.Option("--patience", min=1, help="Early stopping: epochs without improvement.")
    ] = 20,
    min_delta: Annotated[
        float, typer.Option("--min-delta", min=0.0, help="Early stopping: smallest val MSE improvement.")
    ] = 1e-4,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction", help="Hold-out share when DATA has no val split (patients kept together)."
        ),
    ] = 0.1,
    resize_mode: Annotated[
        str, typer.Option("--resize-mode", help="pad (letterbox, as the authors' pretraining) or stretch.")
    ] = "pad",
    augment: AugmentOpt = False,
    cache_decoded: CacheDecodedOpt = True,
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
    """Pretrain the convolutional autoencoder (MSE reconstruction, Adam, batch 64, early stopping).

    Writes OUT/best (the checkpoint to fine-tune from), OUT/last (resume state), history.csv,
    loss_curve.png and reconstructions.png, and compares the validation MSE with the MSE of always
    predicting the mean training image.
    Interrupted (Ctrl-C, a kill, a full disk)? --resume OUT continues after the last finished epoch and ends
    with the weights an uninterrupted run reaches. One command at a time writes OUT.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.train import PretrainConfig, pretrain, resume_run
    from cxrcae.train.distributed import current

    require_data_and_out(data, out, resume)
    main = current().main  # under torchrun only rank 0 shows progress and the result
    with progress_bar(quiet or json_out or not main) as progress:
        if resume is not None:
            result = resume_run(resume, progress, task="pretrain", device=device, num_workers=num_workers)
        else:
            cfg = config_from_options(PretrainConfig, ctx.params)
            result = pretrain(data, out, cfg, progress)
    if main:
        render_result(result, json_out=json_out, quiet=quiet)
