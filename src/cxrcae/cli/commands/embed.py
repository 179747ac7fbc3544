"""``cxrcae embed``: encoder features for files, folders and globs, streamed to .npy/.safetensors/.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import (
    DeviceOpt,
    InferenceBatchOpt,
    JsonOpt,
    MeasuredWorkersOpt,
    QuietOpt,
    console,
    err_console,
    make_table,
    print_json,
)
from cxrcae.errors import EXIT_SOME_FAILED

_LISTED = 5


@app.command("embed")
def embed_command(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or globs.")],
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Any cxrcae checkpoint folder or Hub id; its encoder is used."),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="feats.npy, feats.safetensors or feats.parquet (needs pyarrow)."),
    ],
    pooled: Annotated[
        bool,
        typer.Option(
            "--pooled/--no-pooled", help="Global-average-pooled 512-d vectors, or full 512 x h x w maps."
        ),
    ] = True,
    batch_size: InferenceBatchOpt = 32,
    num_workers: MeasuredWorkersOpt = None,
    recursive: Annotated[
        bool, typer.Option("--recursive/--no-recursive", help="Search folders recursively.")
    ] = True,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="fp32 (reproducible features), bf16, fp16 (GPU) or auto.")
    ] = "fp32",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run: rows kept in OUTPUT.partial for unchanged files (same path, "
            "size and mtime) are reused, the others computed.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract X-ray encoder features at scale, one row per readable image, in input order.

    Beside OUTPUT, <stem>.index.csv lists every input (index, path, status, reason, row): the feature row of
    each file, or why it could not be read. Finished rows are kept in OUTPUT.partial until OUTPUT is written,
    so an interrupted run continues with --resume. Exit codes: 0 = all embedded; 3 = some files failed;
    1 = none ran.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.infer.embed import embed, output_format

    output_format(output)  # fail before loading anything on a bad extension or missing pyarrow
    with progress_bar(quiet or json_out) as progress:
        result = embed(
            paths,
            model,
            output,
            pooled=pooled,
            batch_size=batch_size,
            num_workers=num_workers,  # None: chosen by timing the first batch
            device=device,
            precision=precision,
            recursive=recursive,
            progress=progress,
            resume=resume,
        )
    if json_out:
        print_json(result.to_dict())
    elif not quiet:
        shape = "x".join(map(str, result.feature_shape))
        rows = [
            ["embedded", result.n_ok],
            ["failed", len(result.failures)],
            ["skipped (not images)", len(result.skipped)],
            ["features per image", shape],
            ["speed", f"{result.images_per_second:.1f} img/s"],
            ["output", str(result.output)],
            ["index", str(result.index_csv)],
        ]
        console.print(make_table(f"Embedded {result.n_inputs} file(s)", ["", "value"], rows))
    if result.failures:
        if not json_out:
            for index, path, reason in result.failures[:_LISTED]:
                err_console.print(f"  [red]{index}[/] {path}: {reason}", highlight=False, soft_wrap=True)
            if len(result.failures) > _LISTED:
                err_console.print(f"  ... and {len(result.failures) - _LISTED} more in {result.index_csv}")
            err_console.print(
                f"[yellow]{len(result.failures)} of {result.n_inputs} file(s) could not be read[/] "
                f"(exit code {EXIT_SOME_FAILED}).",
                highlight=False,
            )
        raise typer.Exit(EXIT_SOME_FAILED)
