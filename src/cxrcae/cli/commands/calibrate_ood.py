"""``cxrcae calibrate-ood``: fit a classifier's out-of-distribution guard on its training X-rays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import (
    DecodeWorkersOpt,
    DeviceOpt,
    InferenceBatchOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    console,
    make_table,
    print_json,
)


@app.command("calibrate-ood")
def calibrate_ood_command(
    model: Annotated[
        Path,
        typer.Argument(help="Local classifier checkpoint folder (ood.safetensors + config.json written)."),
    ],
    data: Annotated[
        Path,
        typer.Argument(
            help="Splits CSV (its --split rows), manifest CSV or image folder of training X-rays."
        ),
    ],
    autoencoder: Annotated[
        str | None,
        typer.Option(
            "--autoencoder",
            help="CAE pretraining folder or classifier folder with a guard (its autoencoder is used as "
            "is), or encoder folder (a decoder is trained on it).",
            show_default="the model's encoder_init, else the bundled encoder it came from, else its own",
        ),
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="Rows of a splits CSV to fit on (test rows are never used).")
    ] = "train",
    epochs: Annotated[
        int,
        typer.Option(
            "--epochs",
            min=1,
            help="Most decoder training epochs when no decoder is available (it stops early when its "
            "validation MSE stops improving; the best epoch is kept).",
        ),
    ] = 5,
    quantile: Annotated[
        float,
        typer.Option(
            "--quantile",
            min=0.5,
            max=0.9999,
            help="Threshold: this quantile of training reconstruction errors.",
        ),
    ] = 0.995,
    max_images: Annotated[
        int,
        typer.Option("--max-images", min=40, help="Fit on a seeded subsample of at most this many images."),
    ] = 5000,
    batch_size: InferenceBatchOpt = 32,
    num_workers: DecodeWorkersOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    reuse_guard: Annotated[
        bool,
        typer.Option(
            "--reuse-guard",
            help="Keep MODEL's current guard autoencoder; re-fit only the thresholds (seconds). With the "
            "same DATA, --max-images and --seed as its fit, on the same held-out images.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit the guard `cxrcae predict` uses to flag inputs unlike the training X-rays.

    The guard is an autoencoder stored as MODEL/ood.safetensors with a threshold on its reconstruction
    error (the --quantile of training images' errors) in MODEL/config.json. Without a decoder at hand, one is
    trained on the frozen pretrained encoder and the threshold is set on images it did not train on.
    Test images are never used (test rows, and MODEL/test_split.csv when present).
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.runtime import default_workers
    from cxrcae.train.guard import calibrate_ood

    with progress_bar(quiet or json_out) as progress:
        info = calibrate_ood(
            model,
            data,
            autoencoder=autoencoder,
            split=split,
            epochs=epochs,
            quantile=quantile,
            max_images=max_images,
            batch_size=batch_size,
            num_workers=default_workers(num_workers),
            device=device,
            seed=seed,
            reuse_guard=reuse_guard,
            progress=progress,
        )
    if json_out:
        print_json(info)
        return
    if quiet:
        return
    dist = info["distribution"]
    source = info["autoencoder"]
    rows = [
        ["autoencoder", f"{source['ref']} ({source['kind']}; decoder {source['decoder']})"],
        ["images scored", info["n_images"]],
        ["reconstruction error: median", dist["mse"]["p50"]],
        [f"reconstruction error: threshold ({info['quantile']:.1%})", info["threshold"]],
        ["relative to contrast: median", dist["relative"]["p50"]],
        [f"relative to contrast: threshold ({info['quantile']:.1%})", info["relative_threshold"]],
        ["scored images above a threshold", f"{dist['flagged_fraction']:.2%}"],
    ]
    training = info.get("decoder_training")
    if training:
        epochs = f"{training['epochs_run']} of {training['epochs']} epochs, best {training['best_epoch']}"
        rows.insert(1, ["decoder training", f"{training['images']} images, {epochs}"])
        rows.insert(2, ["decoder validation MSE (best epoch)", min(training["val_mse"])])
    console.print(make_table("Out-of-distribution guard", ["", "value"], rows))
    for note in info.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"Stored the guard in {info['file']} and {info['config']}", highlight=False)
