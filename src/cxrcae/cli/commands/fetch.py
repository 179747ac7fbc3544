"""``cxrcae fetch``: list the public sources, or download, verify, unpack and turn them into manifests."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import JsonOpt, QuietOpt, console, err_console, make_table, print_json


class Purpose(str, Enum):
    classify = "classify"
    pretrain = "pretrain"


def _size(value: int | None, exact: bool) -> str:
    if not value:
        return "?"
    text = f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.1f} MB"
    return text if exact else f"~{text}"


@app.command("fetch")
def fetch_command(
    names: Annotated[
        list[str] | None, typer.Argument(help="Sources to fetch (see --list), e.g. ieee8023 figure1.")
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show the known sources and what is cached.")] = False,
    merge: Annotated[
        Path | None, typer.Option("--merge", help="Also write one manifest CSV joining all named sources.")
    ] = None,
    purpose: Annotated[
        Purpose,
        typer.Option("--for", help="classify: labelled images only; pretrain: unlabeled images too."),
    ] = Purpose.classify,
    mirror: Annotated[
        str | None,
        typer.Option(
            "--mirror",
            envvar="CXRCAE_MIRROR",
            help="Base URL serving every source as MIRROR/<name>/<file> (also $CXRCAE_MIRROR).",
        ),
    ] = None,
    include_ct: Annotated[
        bool, typer.Option("--include-ct", help="Keep CT slices (dropped by default).")
    ] = False,
    include_lateral: Annotated[
        bool, typer.Option("--include-lateral", help="Keep lateral views (dropped by default).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Discard the cached download and extraction and fetch again.")
    ] = False,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Retries after a transient failure.")] = 4,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait on a silent connection.")
    ] = 60.0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fetch public chest X-ray datasets into the cache ($CXRCAE_HOME) and write their manifests.

    Downloads resume after an interruption and are verified by sha256 (recorded at the first download
    where the publisher gives none); a second fetch makes no request. Archives are unpacked safely.
    Manifest columns: path,label,patient_id,source,view,license,finding,original_dataset (NIH, Montgomery and
    Shenzhen add sex,age; Montgomery its lung masks left_lung,right_lung; NIH its official split).
    """
    if list_:
        _list(json_out)
        return
    if not names:
        raise typer.BadParameter("name at least one source, or use --list", param_hint="NAMES")

    from cxrcae.cli.common import progress_bar
    from cxrcae.fetch import fetch_sources

    with progress_bar(quiet or json_out) as progress:
        report = fetch_sources(
            names,
            merge=merge,
            purpose=purpose.value,
            mirror=mirror or None,
            include_ct=include_ct,
            include_lateral=include_lateral,
            force=force,
            progress=progress,
            retries=retries,
            timeout=timeout,
        )

    if json_out:
        print_json(report.as_dict())
    elif not quiet:
        _render(report.results, report.merged)
    for failure in report.failures:
        err_console.print(
            f"[bold red]Error:[/] {failure.name}: {failure.error}", highlight=False, soft_wrap=True
        )
    if not report.ok:
        if merge is not None:
            err_console.print(
                f"{merge} not written: {len(report.failures)} source(s) failed", highlight=False
            )
        raise typer.Exit(report.exit_code)


def _render(results: list[Any], merged: Path | None) -> None:
    from cxrcae.fetch import LABELS

    counts = [r.counts() for r in results]
    others = sorted({label for c in counts for label in c} - set(LABELS))  # other tasks' labels (TB)
    labels = [*LABELS[:-1], *others, LABELS[-1]]
    rows = []
    for r, count in zip(results, counts, strict=True):
        excluded = ", ".join(f"{v} {k}" for k, v in sorted(r.excluded.items())) or "-"
        state = "downloaded" if r.downloaded else "cached"
        rows.append([r.name, len(r.records), *(count.get(label, 0) for label in labels), excluded, state])
    console.print(make_table("Fetched", ["source", "images", *labels, "excluded", "from"], rows))
    for r in results:
        console.print(f"{r.name}: {r.manifest}", highlight=False, soft_wrap=True)
    if merged:
        console.print(f"Merged manifest: {merged}", highlight=False, soft_wrap=True)


def _list(json_out: bool) -> None:
    from cxrcae.fetch import list_sources

    sources = list_sources()
    if json_out:
        print_json(sources)
        return
    rows = [
        [
            s["name"],
            f"{s['images']:,}" if s["images"] else "?",
            ", ".join(s["classes"]),
            _size(s["size"], s["size_exact"]),
            s["license"],
            s["cached"],
        ]
        for s in sources
    ]
    table = make_table("Sources", ["name", "images", "classes", "size", "license", "cached"], rows)
    console.print(table)
    note = "Kaggle sources need: pip install 'cxrcae[kaggle]' and a Kaggle API token."
    console.print(note, highlight=False, markup=False)
