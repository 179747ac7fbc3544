"""``cxrcae reproduce``: the paper's method end to end on one dataset, in one run folder."""

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
    console,
    make_table,
    print_json,
)


@app.command("reproduce")
def reproduce_command(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Argument(
            help="Labelled data: a class folder, a manifest CSV (unlabeled rows join the pretraining) or a "
            "splits CSV from `cxrcae split`."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    image_size: ImageSizeOpt = 224,
    pretrain_epochs: Annotated[
        int,
        typer.Option("--pretrain-epochs", min=1, help="Maximum CAE epochs (early stopping, patience 20)."),
    ] = 100,
    finetune_epochs: Annotated[
        int,
        typer.Option("--finetune-epochs", min=1, help="Maximum epochs per unfreezing stage (patience 5)."),
    ] = 20,
    head: Annotated[
        str, typer.Option("--head", help="lstm (proposed), lstm3, lstm-dense3, dense5.")
    ] = "lstm",
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the test CIs.")
    ] = 1000,
    audit: Annotated[
        bool, typer.Option("--audit/--no-audit", help="Audit duplicates and leakage before training.")
    ] = True,
    limit_batches: LimitBatchesOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    num_workers: TrainWorkersOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Reproduce the paper on DATA: split, audit, pretrain the CAE, fine-tune with gradual unfreezing, test.

    The autoencoder sees only the train/val images, so the test split stays unseen until the final
    evaluation. Writes OUT/splits.csv, OUT/audit.json, OUT/cae/, OUT/clf/, OUT/clf/best/eval-test/ and
    OUT/summary.json.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.pipeline import PipelineConfig, run_pipeline

    cfg = config_from_options(PipelineConfig, ctx.params)
    with progress_bar(quiet or json_out) as progress:
        result = run_pipeline(data, out, cfg, progress)
    if json_out:
        print_json(result.to_dict())
        return
    if quiet:
        return
    _render(result)


def _render(result) -> None:
    def ci(pair) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else ""

    pre, fin, test = result.pretrain, result.finetune, result.test
    rows = [
        ["CAE val MSE", pre["best_val_mse"], f"mean-image baseline {pre['mean_image_val_mse']:.5f}"],
        ["classifier val loss", fin["best_val_loss"], f"{fin['epochs_run']} epochs"],
        ["test accuracy", test["accuracy"], ci(test["accuracy_ci"])],
        ["test macro F1", test["macro_f1"], ci(test["macro_f1_ci"])],
        ["test macro AUC", test["macro_auc"], ci(test["macro_auc_ci"])],
        ["test ECE", test["ece"], ""],
    ]
    title = f"Reproduction on {test['n']} test images (95% CI by {test['ci_unit'] or 'image'} bootstrap)"
    console.print(make_table(title, ["figure", "value", "note"], rows))
    if result.audit is not None:
        a = result.audit
        console.print(
            f"Audit: {a['exact_duplicate_groups']} exact / {a['near_duplicate_groups']} near duplicate "
            "groups, "
            f"{a['cross_split_groups']} across splits, {a['patients_in_several_splits']} patients in several "
            f"splits, {a['dominated_classes']} class(es) dominated by one source",
            highlight=False,
        )
    console.print(f"Run folder: {result.out_dir}  (summary.json, report: {result.files.get('report', '-')})")
