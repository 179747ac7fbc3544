"""``cxrcae split``: write a leak-free train/val/test splits CSV and show what landed where."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import (
    JsonOpt,
    QuietOpt,
    SeedOpt,
    comma_list,
    console,
    err_console,
    make_table,
    print_json,
)

_MAX_LISTED_ERRORS = 5


def _parse_ratios(text: str) -> tuple[float, float, float]:
    from cxrcae.data.splits import check_ratios
    from cxrcae.errors import DataError

    values = comma_list(text, float, "--ratios")
    try:
        return check_ratios(values)
    except DataError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("split")
def split_command(
    data: Annotated[
        Path, typer.Argument(help="Dataset: a root/<CLASS>/ image folder or a manifest CSV (path,label,...).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Splits CSV to write (manifest columns + split).")],
    ratios: Annotated[
        str, typer.Option("--ratios", help="Train,val,test fractions summing to 1 (paper: 73/13.5/13.5).")
    ] = "0.73,0.135,0.135",
    seed: SeedOpt = 0,
    no_dedupe: Annotated[
        bool, typer.Option("--no-dedupe", help="Skip decoding every image to merge exact pixel duplicates.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Threads for pixel hashing.", show_default="CPUs, max 8"),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Split DATA into train/val/test, stratified by class, never splitting a patient or duplicate images.

    Images sharing a patient_id, or with identical pixels, always land in the same split. Same seed and
    data give the same split.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.data import load_records, write_records
    from cxrcae.data.splits import split_records

    fractions = _parse_ratios(ratios)
    records = load_records(data, labeled=True)
    with progress_bar(quiet) as progress:
        result = split_records(
            records, fractions, seed, dedupe=not no_dedupe, workers=workers, progress=progress
        )
    written = write_records(result.records, out)

    summary = {"data": str(data), "out": str(written), **result.summary()}
    if json_out:
        print_json(summary)
        return
    _warn_unreadable(result.hash_errors)
    if not quiet:
        _render(summary)


def _warn_unreadable(errors: list[tuple[Path, str]]) -> None:
    if not errors:
        return
    err_console.print(
        f"[yellow]Warning:[/] {len(errors)} file(s) could not be decoded for duplicate detection "
        "(kept in the split, not deduplicated):",
        highlight=False,
    )
    for path, reason in errors[:_MAX_LISTED_ERRORS]:
        err_console.print(f"  {path}: {reason}", highlight=False, soft_wrap=True)
    if len(errors) > _MAX_LISTED_ERRORS:
        err_console.print(f"  ... and {len(errors) - _MAX_LISTED_ERRORS} more (see --json)", highlight=False)


def _render(summary: dict[str, Any]) -> None:
    splits: dict[str, Any] = summary["splits"]
    names = list(splits)

    def cell(count: int, percent: float) -> str:
        return f"{count} ({percent:.1f}%)"

    rows: list[list[Any]] = []
    for label in summary["classes"]:
        total = sum(splits[s]["classes"][label]["count"] for s in names)
        rows.append([label, *(cell(**splits[s]["classes"][label]) for s in names), total])
    shares = (cell(splits[s]["images"], splits[s]["percent"]) for s in names)
    rows.append(["all images", *shares, summary["images"]])
    for title, key in (("patients", "patients"), ("no patient id", "without_patient_id")):
        rows.append([title, *(splits[s][key] for s in names), sum(splits[s][key] for s in names)])
    ratio_text = "/".join(f"{100 * r:g}" for r in summary["ratios"])
    title = f"Split of {summary['images']} images ({ratio_text}, seed {summary['seed']})"
    console.print(make_table(title, ["class", *names, "total"], rows))
    if summary["dedupe"]:
        line = (
            f"{summary['duplicate_groups']} duplicate group(s) ({summary['duplicate_files']} files with "
            "identical pixels) kept within one split"
        )
        if summary["duplicate_groups_conflicting_labels"]:
            line += f"; {summary['duplicate_groups_conflicting_labels']} of them carry conflicting labels"
        console.print(line, highlight=False)
    else:
        console.print("Pixel duplicates not checked (--no-dedupe).", highlight=False)
    console.print(f"{summary['groups']} leak-free groups. Wrote {summary['out']}", highlight=False)
