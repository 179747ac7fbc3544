"""Options, consoles and output helpers shared by every command."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cxrcae._parse import comma_list as comma_list  # re-exported: every command's comma-separated options

console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout instead of a table.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; errors only.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (splits, init, shuffling).")]
DEFAULT_WORKERS_TEXT = "CPUs-2, max 4"
"""What ``cxrcae.runtime.default_workers`` gives, for ``--help`` (which must not import torch to ask it)."""
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 where faster: CUDA GPUs, CPUs where the speed probe measured it faster; else "
        "fp32), fp32, bf16, fp16 (GPU only).",
    ),
]
EvalPrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="fp32 (the default, so a model scores the same on every machine), bf16, fp16 (GPU) or auto; "
        "recorded in metrics.json.",
    ),
]
InferenceBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
DecodeWorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--num-workers", min=0, help="Decoding worker processes.", show_default=DEFAULT_WORKERS_TEXT
    ),
]


MeasuredWorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--num-workers",
        min=0,
        help="Decoding worker processes.",
        show_default="chosen by timing the first batch, max 4",
    ),
]


def print_json(data: Any) -> None:
    """Machine-readable output goes to stdout untouched by rich markup."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def make_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    table = Table(title=title, header_style="bold")
    for col in columns:
        table.add_column(str(col), justify="left" if col == columns[0] else "right")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


class _InfoColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        return Text(str(task.fields.get("info", "")), style="cyan")


@contextmanager
def progress_bar(quiet: bool = False):
    """Yields a ``ProgressFn`` drawing rich bars on stderr (stdout stays clean for --json)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _InfoColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def report(task: str, done: int, total: int | None = None, info: str = "") -> None:
        if task not in tasks:
            tasks[task] = progress.add_task(task, total=total, info=info)
        progress.update(tasks[task], completed=done, total=total, info=info)

    with progress:
        yield report


def path_arg(path: Path) -> Path:
    return Path(path).expanduser()
