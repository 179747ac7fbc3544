"""``cxrcae pull``: download a checkpoint from the Hugging Face Hub (safetensors only) and verify it loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import JsonOpt, QuietOpt, console, make_table, print_json

TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", help="Hugging Face token. Never printed.", show_default="HF_TOKEN or the saved login"
    ),
]


@app.command("pull")
def pull_command(
    repo: Annotated[str, typer.Argument(help="Hub id user/repo or user/repo@revision.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Copy the checkpoint here (default: stay in the HF cache)."),
    ] = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fetch model.safetensors + config.json (+ README.md) from the Hub and load it strictly.

    Cached by huggingface_hub; with HF_HUB_OFFLINE=1 it is served from the cache without network. Repos
    without safetensors weights, or whose weights do not match their config, are refused.
    """
    from cxrcae.hub.transfer import hub_progress_bars, pull

    with hub_progress_bars(not (quiet or json_out)):
        result = pull(repo, out, token=token)
    summary = {
        "repo": result.repo_id,
        "revision": result.revision or "main",
        "commit": result.commit,
        "kind": result.kind,
        "task": result.task,
        "predicts": result.summary,
        "folder": str(result.folder),
        "files": result.files,
        "image_size": result.config.get("image_size"),
        "class_names": result.config.get("class_names"),
        "num_parameters": result.config.get("num_parameters"),
    }
    if json_out:
        print_json(summary)
    elif not quiet:
        rows = [
            [k, ", ".join(map(str, v)) if isinstance(v, list) else v]
            for k, v in summary.items()
            if v is not None
        ]
        console.print(make_table(f"Pulled {repo}", ["", "value"], rows))
