"""``cxrcae reconstruct``: input | reconstruction | |error| views of an autoencoder, with per-image MSE."""

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
    console,
    err_console,
    make_table,
    print_json,
)
from cxrcae.errors import EXIT_SOME_FAILED


@app.command("reconstruct")
def reconstruct_command(
    model: Annotated[
        str, typer.Argument(help="Autoencoder checkpoint folder or Hub id user/repo@rev (rev optional).")
    ],
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or globs.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the PNG views and reconstruction.csv.")
    ],
    error_max: Annotated[
        float,
        typer.Option("--error-max", min=1e-6, help="Absolute error shown at full colour in the error panel."),
    ] = 0.25,
    batch_size: InferenceBatchOpt = 16,
    num_workers: DecodeWorkersOpt = None,
    show: Annotated[int, typer.Option("--show", min=0, help="Rows shown in the terminal table.")] = 30,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write input | reconstruction | |error| PNGs per image, an overview grid and reconstruction.csv (MSE,
    MAE, PSNR per image). Exit code 3 when some files could not be read.
    """
    from dataclasses import asdict

    from cxrcae.cli.common import progress_bar
    from cxrcae.errors import CxrcaeError
    from cxrcae.infer.reconstruct import reconstruct
    from cxrcae.runtime import default_workers

    with progress_bar(quiet or json_out) as progress:
        result = reconstruct(
            model,
            paths,
            out,
            batch_size=batch_size,
            num_workers=default_workers(num_workers),
            device=device,
            error_max=error_max,
            progress=progress,
        )
    if not result.rows:
        raise CxrcaeError(f"no image files found in {', '.join(paths)}")
    if json_out:
        print_json(
            {
                "out_dir": str(result.out_dir),
                "mean_mse": result.mean_mse(),
                "rows": [asdict(r) for r in result.rows],
            }
        )
    elif not quiet:
        rows = [
            [
                Path(r.path).name,
                r.mse,
                r.psnr,
                r.status if r.status == "ok" else f"[red]{r.status}[/]: {r.reason}",
            ]
            for r in result.rows[:show]
        ]
        console.print(
            make_table(
                f"Reconstruction ({len(result.rows)} file(s))", ["file", "MSE", "PSNR (dB)", "status"], rows
            )
        )
        if len(result.rows) > show:
            console.print(f"... {len(result.rows) - show} more row(s) in {result.csv}", highlight=False)
        mean = result.mean_mse()
        if mean is not None:
            console.print(f"mean MSE {mean:.5f}", highlight=False)
        written = [result.csv.name] + ([result.overview.name] if result.overview else [])
        console.print(
            f"Wrote {result.out_dir}/: {', '.join(written)} and one <name>.recon.png per image",
            highlight=False,
        )
    if result.n_errors:
        if not json_out:
            err_console.print(
                f"[yellow]{result.n_errors} file(s) could not be read[/] (exit code {EXIT_SOME_FAILED}).",
                highlight=False,
            )
        raise typer.Exit(EXIT_SOME_FAILED)
