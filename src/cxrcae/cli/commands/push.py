"""``cxrcae push``: upload a checkpoint folder (weights, config, generated model card) as one Hub commit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.commands.pull import TokenOpt
from cxrcae.cli.common import JsonOpt, QuietOpt, console, print_json


@app.command("push")
def push_command(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint folder (model.safetensors + config.json).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo user/repo (created if missing).")],
    encoder_only: Annotated[
        bool, typer.Option("--encoder-only", help="Upload just the pretrained encoder (kind 'encoder').")
    ] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", "--branch", help="Branch to commit to (created if missing).")
    ] = None,
    token: TokenOpt = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics",
            help="metrics.json for the card.",
            show_default="MODEL_DIR/metrics.json or eval-test/",
        ),
    ] = None,
    card: Annotated[
        Path | None, typer.Option("--card", help="Use this README.md instead of generating the model card.")
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Push MODEL_DIR to the Hugging Face Hub as a single commit.

    The folder is loaded strictly first; the model card (README.md) is generated from config.json and the
    evaluation metrics. The token comes from --token, HF_TOKEN or `hf auth login` and is never printed.
    """
    from cxrcae.cli.common import progress_bar
    from cxrcae.hub.transfer import hub_progress_bars, push_checkpoint

    with progress_bar(quiet or json_out) as progress, hub_progress_bars(not (quiet or json_out)):
        result = push_checkpoint(
            model_dir,
            repo_id,
            encoder_only=encoder_only,
            private=True if private else None,
            revision=revision,
            token=token,
            commit_message=message,
            metrics=metrics,
            card=card,
            progress=progress,
        )
    if json_out:
        print_json(vars(result))
    elif not quiet:
        console.print(
            f"Pushed {result.kind} to [bold]{result.repo_id}[/] (branch {result.revision}, commit "
            f"{result.commit_oid[:10]}): {', '.join(result.files)}",
            highlight=False,
        )
        console.print(result.commit_url, highlight=False)
