"""``cxrcae audit``: duplicates, split leakage, source bias and a model shortcut probe (exit 3: leakage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    console,
    err_console,
    make_table,
    print_json,
)

_SHOW = 10


@app.command("audit")
def audit_command(
    data: Annotated[
        Path,
        typer.Argument(help="Manifest or splits CSV (a split column enables leak checks), or a folder."),
    ],
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the full report: .json, else Markdown.")
    ] = None,
    near_threshold: Annotated[
        int,
        typer.Option(
            "--near-threshold",
            min=-1,
            max=64,
            help="Near duplicates: perceptual-hash bits (of 64) that may differ; -1 skips the check.",
        ),
    ] = 2,
    dominance: Annotated[
        float,
        typer.Option("--dominance", min=0.0, max=1.0, help="Warn when one source supplies more of a class."),
    ] = 0.8,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Exit 3 on any duplicate or dominated class as well."),
    ] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Threads for hashing.", show_default="CPUs, max 8")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Also probe this model's encoder features for shortcuts: can they predict each image's "
            "source? A checkpoint folder, a Hub id, or 'bundled' for the model shipped with cxrcae.",
        ),
    ] = None,
    probe_images: Annotated[
        int | None,
        typer.Option(
            "--probe-images",
            min=10,
            help="Probe a seeded sample of about this many images (whole patients) instead of all.",
        ),
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Find duplicate images, split leakage and classes that come mostly from one source.

    Checks DATA for exact duplicates (decoded pixels) and near duplicates (perceptual hash), within and
    across sources; patients and duplicate images present in more than one split; and a class x source
    table warning when one source supplies most of a class.

    With --model, a linear probe on the model's encoder features predicts each image's source and its
    label (patient-grouped cross-validation), next to Cramer's V of class x source; a high source score
    on confounded data is a warning.

    Exit codes: 0 clean (warnings allowed), 3 leakage between splits (or any finding with --strict),
    1 error. Unreadable images are reported and skipped.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.data import load_records
    from cxrcae.data.audit import LEAKAGE_EXIT_CODE, audit_records, write_report
    from cxrcae.errors import DataError
    from cxrcae.runtime import default_workers

    checks = []
    if model is not None:
        from cxrcae.eval.shortcut import ShortcutCheck

        checks.append(
            ShortcutCheck(
                model,
                max_images=probe_images,
                seed=seed,
                num_workers=default_workers(),
                device=device,
            )
        )

    try:  # class folders and labelled CSVs keep their labels; anything else is audited unlabeled
        records = load_records(data, labeled=True)
    except DataError:
        records = load_records(data, labeled=False)
    with progress_bar(quiet or json_out) as progress:
        result = audit_records(
            records,
            near_threshold=None if near_threshold < 0 else near_threshold,
            dominance=dominance,
            workers=workers,
            progress=progress,
            checks=checks,
        )
    if report is not None:
        write_report(result, report, title=f"Audit of {data}")

    if json_out:
        print_json({"data": str(data), **result.as_dict()})
    elif not quiet:
        _render(result, report)

    findings = result.exact_groups or result.near_groups or result.dominant or result.section_warnings
    if result.leakage or (strict and findings):
        reason = (
            "leakage between splits" if result.leakage else "duplicates, source bias or shortcut (--strict)"
        )
        err_console.print(f"[bold red]Audit failed:[/] {reason}", highlight=False)
        raise typer.Exit(LEAKAGE_EXIT_CODE)


def _render(result: Any, report: Path | None) -> None:
    sources = sorted({s for row in result.class_source.values() for s in row})
    rows = [
        [label, *(row.get(s, 0) for s in sources), sum(row.values())]
        for label, row in result.class_source.items()
    ]
    console.print(make_table(f"{result.images} images: class x source", ["class", *sources, "total"], rows))
    for d in result.dominant:
        err_console.print(
            f"[yellow]Warning:[/] {d['share']:.0%} of {d['label']} ({d['images']} images) comes from "
            f"{d['source']}: a model can learn the source instead of the disease.",
            highlight=False,
        )

    s = result.summary()
    near = "skipped" if result.near_threshold is None else f"{s['near_duplicate_groups']} group(s)"
    lines = [
        f"Exact duplicates: {s['exact_duplicate_groups']} group(s), {s['exact_duplicate_images']} images",
        f"Near duplicates (<= {result.near_threshold} bits): {near}",
        f"Duplicate groups spanning sources: {s['cross_source_groups']}",
    ]
    if result.has_splits:
        lines += [
            f"Duplicate groups spanning splits: {s['cross_split_groups']}",
            f"Patients in more than one split: {s['patients_in_several_splits']}",
        ]
    else:
        lines.append("No split column: leakage between splits not checked.")
    for line in lines:
        console.print(line, highlight=False)

    for leak in result.patient_leaks[:_SHOW]:
        where = ", ".join(f"{k} ({v})" for k, v in leak["splits"].items())
        err_console.print(
            f"  patient {leak['patient_id']} [{leak['source'] or '?'}] in {where}", highlight=False
        )
    for group in result.leaking_groups[:_SHOW]:
        paths = ", ".join(f"{group.records[i].path} ({group.records[i].split})" for i in group.members[:4])
        err_console.print(f"  {group.kind} duplicate across splits: {paths}", highlight=False, soft_wrap=True)
    for section in result.sections:
        console.print(make_table(section.title, *section.table()))
        for extra in section.notes:
            console.print(f"  {extra}", highlight=False, soft_wrap=True)
        for warning in section.warnings:
            err_console.print(f"[yellow]Warning:[/] {warning}", highlight=False, soft_wrap=True)
    if result.unreadable:
        err_console.print(
            f"[yellow]Warning:[/] {len(result.unreadable)} unreadable file(s):", highlight=False
        )
        for path, reason in result.unreadable[:_SHOW]:
            err_console.print(f"  {path}: {reason}", highlight=False, soft_wrap=True)
    if report is not None:
        console.print(f"Report: {report}", highlight=False, soft_wrap=True)
