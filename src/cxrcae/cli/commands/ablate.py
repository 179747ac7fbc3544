"""``cxrcae ablate``: does CAE pretraining help? The paper's classifier against random-init twins, paired."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    make_table,
    print_json,
)


@app.command("ablate")
def ablate_command(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Argument(
            help="Labelled data: a class folder, a manifest CSV or a splits CSV from `cxrcae split`."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Study folder (rerun the same command to continue).")
    ],
    fractions: Annotated[
        str,
        typer.Option(
            "--fractions",
            help="Labelled shares of the training images, comma-separated: one point of the "
            "label-efficiency curve each (pretraining always uses every train/val image).",
        ),
    ] = "1",
    image_size: ImageSizeOpt = 224,
    pretrain_epochs: Annotated[
        int, typer.Option("--pretrain-epochs", min=1, help="Maximum CAE epochs (patience 20).")
    ] = 100,
    finetune_epochs: Annotated[
        int,
        typer.Option(
            "--finetune-epochs",
            min=1,
            help="Maximum epochs per stage; the plain recipe gets the same total in its single stage.",
        ),
    ] = 20,
    plain_lrs: Annotated[
        str,
        typer.Option(
            "--plain-lrs", help="Learning rates tried for the random encoder's plain recipe (chosen on val)."
        ),
    ] = "1e-3,1e-4",
    encoder: Annotated[
        str | None,
        typer.Option(
            "--encoder", help="Reuse this CAE (pretrain run folder or Hub id) instead of pretraining."
        ),
    ] = None,
    head: Annotated[
        str, typer.Option("--head", help="lstm (proposed), lstm3, lstm-dense3, dense5.")
    ] = "lstm",
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=1, help="Paired bootstrap resamples for the CIs.")
    ] = 1000,
    limit_batches: LimitBatchesOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    num_workers: TrainWorkersOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Does CAE pretraining help? Train the paper's classifier and its random-initialisation twins on the
    same split, seed and budget, and compare them on the same test patients (paired bootstrap).

    Arms: cae (paper recipe over the CAE encoder), random (same recipe, random encoder), random-plain (random
    encoder, all layers from the start, learning rate chosen on validation). Writes OUT/ablation.json,
    ablation.csv, comparisons.csv and ablation.png.
    """
    from cxrcae.ablation import AblationConfig, run_ablation
    from cxrcae.cli.common import progress_bar

    options = dict(ctx.params)
    options["fractions"] = comma_list(fractions, float, "--fractions")
    options["plain_lrs"] = comma_list(plain_lrs, float, "--plain-lrs")
    cfg = config_from_options(AblationConfig, options)
    with progress_bar(quiet or json_out) as progress:
        result = run_ablation(data, out, cfg, progress)
    if json_out:
        print_json(result.to_dict())
    elif not quiet:
        _render(result)


def _render(result) -> None:
    from cxrcae.ablation import NAMES, arm_rows, comparison_rows

    def ci(lo, hi) -> str:
        return "" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"

    arms = [
        [
            f"{r['fraction']:.0%} ({r['train_images']})",
            r["arm"],
            f"{r['recipe']} lr {r['lr']:g}",
            f"{r['accuracy']:.3f} {ci(r['accuracy_lo'], r['accuracy_hi'])}",
            f"{r['macro_f1']:.3f} {ci(r['macro_f1_lo'], r['macro_f1_hi'])}",
            ""
            if r["macro_auc"] is None
            else f"{r['macro_auc']:.3f} {ci(r['macro_auc_lo'], r['macro_auc_hi'])}",
        ]
        for r in arm_rows(result.points)
    ]
    columns = ["labels (train images)", "arm", "recipe", "accuracy", "macro F1", "macro AUC"]
    console.print(make_table("Test metrics per arm (95% CI)", columns, arms))
    diffs = [
        [
            f"{r['fraction']:.0%}",
            r["comparison"],
            r["metric"],
            f"{r['difference']:+.3f}" if r["difference"] is not None else "",
            ci(r["ci_lo"], r["ci_hi"]),
            "" if r["p_cae_not_better"] is None else f"{r['p_cae_not_better']:.3f}",
        ]
        for r in comparison_rows(result.points, NAMES)
    ]
    unit = result.points[0]["comparisons"]["cae-vs-random"]["unit"] if result.points else "image"
    title = f"Paired difference, cae minus baseline (95% CI, {unit} bootstrap)"
    columns = ["labels", "comparison", "metric", "difference", "95% CI", "P(cae not better)"]
    console.print(make_table(title, columns, diffs))
    console.print(
        f"Study folder: {result.out_dir}  (ablation.json, ablation.csv, comparisons.csv, ablation.png)"
    )
