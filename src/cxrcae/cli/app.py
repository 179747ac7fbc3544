"""The Typer application, its error rendering and the discovery of command modules.

Each file in ``cxrcae/cli/commands/`` registers its commands on ``app``; they are imported here so that
adding a command never means editing a shared file. Command modules must not import torch at module
level: ``cxrcae --help`` has to answer in well under a second.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.29 ships its own copy of click; its exceptions are the ones to catch
    import typer._click as click
except ImportError:  # pragma: no cover - older typer uses click itself
    import click

from cxrcae import __version__
from cxrcae.errors import CxrcaeError


class CleanError(click.ClickException):
    """Shown as one red line on stderr; no traceback."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        from rich.markup import escape

        from cxrcae.cli.common import err_console

        # escaped: messages are plain text; `pip install "cxrcae[serve]"` must not lose "[serve]" as markup
        err_console.print(f"[bold red]Error:[/] {escape(self.message)}", highlight=False, soft_wrap=True)


# The order a user meets the commands in: the bundled model first, then data, training, results, sharing.
COMMAND_ORDER = (
    "samples",
    "predict",
    "serve",
    "reproduce",
    "ablate",
    "transfer",
    "fetch",
    "audit",
    "split",
    "pretrain",
    "finetune",
    "evaluate",
    "calibrate",
    "calibrate-ood",
    "reconstruct",
    "embed",
    "probe",
    "export",
    "push",
    "pull",
    "import-keras",
    "bench",
)


class _Group(TyperGroup):
    """Turns core errors (and OS errors such as a full disk) into clean one-line messages."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return self._invoke(ctx)
        except CleanError as exc:  # typer would draw a boxed panel; one line is what users asked for
            exc.show()
            raise typer.Exit(exc.exit_code) from None

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, typer.Abort, typer.Exit):
            raise
        except CxrcaeError as exc:
            raise CleanError(_with_notes(str(exc), exc), exc.exit_code) from None
        except KeyboardInterrupt as exc:  # the core's notes say what was kept and how to resume
            raise CleanError(_with_notes("interrupted", exc), 130) from None
        except OSError as exc:
            raise CleanError(_with_notes(_describe_os_error(exc), exc)) from None
        except Exception as exc:  # a bug: keep the message short, the traceback on request
            if os.environ.get("CXRCAE_DEBUG"):
                raise
            raise CleanError(
                f"internal error: {type(exc).__name__}: {exc} (set CXRCAE_DEBUG=1 for the traceback)"
            ) from None


def _with_notes(message: str, exc: BaseException) -> str:
    """``message`` and the notes the core added to ``exc`` (``add_note``), still one line."""
    return "; ".join([message, *getattr(exc, "__notes__", ())])


def _describe_os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}"


app = typer.Typer(
    name="cxrcae",
    cls=_Group,
    help="Chest X-ray autoencoder pretraining, fine-tuning, evaluation, prediction and sharing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cxrcae {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", help="Print the version and exit.", callback=_version, is_eager=True),
    ] = False,
) -> None:
    """Chest X-ray autoencoder pretraining, fine-tuning, evaluation, prediction and sharing."""


def _register_commands() -> None:
    import cxrcae.cli.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}")


_register_commands()


def main() -> None:
    """Console-script entry point; usage errors exit 2, user errors 1."""
    from cxrcae.allocator import keep_freed_memory

    keep_freed_memory()  # before any tensor exists: every command's large blocks reuse pages
    try:
        app(prog_name="cxrcae")
    except CxrcaeError as exc:  # raised outside a command (e.g. in a callback)
        CleanError(str(exc), exc.exit_code).show()
        sys.exit(exc.exit_code)
