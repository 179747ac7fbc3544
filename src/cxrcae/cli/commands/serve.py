"""``cxrcae serve``: a local web page and JSON API for drag-and-drop prediction with Grad-CAM heat maps."""

from __future__ import annotations

from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import DeviceOpt, PrecisionOpt, console, err_console

# import names of the `serve` extra: a missing one is an install hint, not a traceback
SERVE_MODULES = ("fastapi", "fastapi_offline", "uvicorn", "python_multipart", "starlette")
INSTALL_HINT = 'cxrcae serve needs FastAPI and uvicorn: pip install "cxrcae[serve]"'


@app.command("serve")
def serve_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Classifier checkpoint folder, or Hub id user/repo (user/repo@rev for a revision).",
            show_default="bundled default model",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on; anything but loopback prints a warning."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0 = any free one).")
    ] = 8000,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, help="Model threads, each with its own copy of the model."),
    ] = 1,
    queue: Annotated[
        int,
        typer.Option(
            "--queue",
            min=1,
            help="Requests held at once (uploading, waiting or running); one more gets 503 + Retry-After.",
        ),
    ] = 8,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="Largest upload accepted (413 beyond it).")
    ] = 64.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="CXRCAE_API_KEY",
            help="Require this key on every request (X-API-Key, Bearer, or Basic password in a browser).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Serve a web page and a JSON API: drop an X-ray, get class probabilities and a Grad-CAM heat map.

    Page at /, POST /predict (?explain=1 adds the overlay), GET /health, GET /model, API docs at /docs.
    Listens on 127.0.0.1 unless told otherwise. Ctrl-C stops it.
    """
    from cxrcae.errors import CxrcaeError

    try:
        from cxrcae.serve import run_server
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in SERVE_MODULES:
            raise CxrcaeError(f"{INSTALL_HINT} ({exc.name} is not installed)") from None
        raise

    def announce(info) -> None:
        from rich.markup import escape

        for warning in info.warnings:
            err_console.print(f"[bold yellow]Warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        key = "; API key required" if info.api_key else ""
        console.print(
            f"Serving {info.model_id} ({info.model_version}) on {info.device}, {info.workers} worker(s), "
            f"queue {info.queue_size}{key}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        docs = f"Open {info.url}/  (API docs: {info.url}/docs; Ctrl-C to stop)"
        console.print(docs, markup=False, highlight=False, soft_wrap=True)

    run_server(
        model,
        host=host,
        port=port,
        workers=workers,
        queue_size=queue,
        max_upload=int(max_upload_mb * 1024 * 1024),
        api_key=api_key or None,
        device=device,
        precision=precision,
        on_ready=announce,
    )
