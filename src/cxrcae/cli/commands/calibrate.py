"""``cxrcae calibrate``: fit temperature scaling on the val split and store it in the model's config.json."""

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
    console,
    make_table,
    print_json,
)


@app.command("calibrate")
def calibrate_command(
    model: Annotated[
        Path, typer.Argument(help="Local classifier checkpoint folder (its config.json is updated).")
    ],
    data: Annotated[Path, typer.Argument(help="Splits CSV; its 'val' rows are used.")],
    batch_size: InferenceBatchOpt = 32,
    num_workers: DecodeWorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: EvalPrecisionOpt = "fp32",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit one temperature T on the val split (minimum NLL); store it as "temperature" in config.json.

    Predictions keep their arg-max class; only the probabilities become better calibrated. predict and
    evaluate apply T automatically.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.eval.calibration import calibrate
    from cxrcae.runtime import default_workers

    with progress_bar(quiet or json_out) as progress:
        info = calibrate(
            model,
            data,
            batch_size=batch_size,
            num_workers=default_workers(num_workers),
            device=device,
            precision=precision,
            progress=progress,
        )
    if json_out:
        print_json(info)
        return
    if quiet:
        return
    rows = [
        ["NLL", info["nll_before"], info["nll_after"]],
        ["ECE", info["ece_before"], info["ece_after"]],
    ]
    console.print(
        make_table(
            f"Temperature scaling on {info['n']} val images",
            ["", "T = 1", f"T = {info['temperature']:.3f}"],
            rows,
        )
    )
    console.print(f"Stored temperature {info['temperature']:.4f} in {info['config']}", highlight=False)
