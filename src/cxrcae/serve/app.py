"""The FastAPI application: the JSON API, the page at ``/`` and the offline API docs at ``/docs``.

``create_app(runner)`` wires a loaded ``ModelRunner`` into routes; it owns no model and starts no server
(``cxrcae.serve.server`` does), so tests drive it with the framework's test client. Order of checks on
``POST /predict``: API key (401), declared size (413, before a byte is read), a free slot in the queue (503 +
Retry-After), the body as it streams in (413), the content's magic bytes (415), then the model (422 when the
decoders refuse the image). Every asset is served from the package (the page, its script and style, and
Swagger UI via fastapi-offline); the page's Content-Security-Policy forbids anything else, so it works with
no internet. Logs say what happened to a request (status, format, size, time), never a file name or a DICOM
tag.
"""

from __future__ import annotations

import hmac
import logging
import time
from base64 import b64decode
from binascii import Error as Base64Error
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict
from starlette.requests import ClientDisconnect

from cxrcae import __version__
from cxrcae.errors import CxrcaeError, ImageLoadError
from cxrcae.serve.runner import ModelRunner, QueueFull
from cxrcae.serve.uploads import (
    DEFAULT_MAX_UPLOAD,
    UploadError,
    check_declared_length,
    extract_upload,
    read_body,
    require_format,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_KEY_ENV = "CXRCAE_API_KEY"
log = logging.getLogger("cxrcae.serve")

# The page may load nothing that the package does not serve itself.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class PredictAnswer(BaseModel):
    """One classified upload. Keys not listed here (for example ``out_of_distribution``, where the model has
    an out-of-distribution guard) are passed through from ``cxrcae predict``'s row unchanged."""

    model_config = ConfigDict(extra="allow")

    label: str
    probability: float
    top_class: str
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    model: dict[str, str]
    input: dict[str, Any]
    seconds: float
    preview_png: str | None = None
    overlay_png: str | None = None


class Problem(BaseModel):
    detail: str


_PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
    "description": "A PNG, JPEG, TIFF or DICOM file: the 'file' field of a form, or the raw body. The format "
    "is recognised from the content, whatever the file is called.",
}


def create_app(
    runner: ModelRunner, *, api_key: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD
) -> FastAPI:
    """The ASGI app answering with ``runner``; with ``api_key`` every request must carry it."""

    if max_upload < 1:
        raise CxrcaeError(f"the upload limit must be positive, got {max_upload} bytes")
    app = FastAPIOffline(
        title="cxrcae",
        version=__version__,
        description="Chest X-ray classification with Grad-CAM heat maps. Research software, not a medical "
        "device. With an API key set, send it as `X-API-Key`, `Authorization: Bearer KEY`, or as the "
        "password of HTTP Basic authentication (what a browser asks for).",
        redoc_url=None,
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if api_key:
        app.add_middleware(RequireApiKey, key=api_key)
    app.add_middleware(SecurityHeaders)  # outermost: a 401 gets the headers too

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health", summary="Liveness, the model's id and the queue")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "model": {"id": runner.info.id, "version": runner.info.version},
            "queue": runner.stats(),
            "max_upload_bytes": max_upload,
        }

    @app.get("/model", summary="The model card and config.json")
    async def model() -> dict[str, Any]:
        info = runner.info
        return {
            "id": info.id,
            "version": info.version,
            "class_names": info.class_names,
            "image_size": info.image_size,
            "resize_mode": info.resize_mode,
            "explain": info.can_explain,
            "device": str(runner.device),
            "precision": runner.precision,
            "card": info.card,
            "config": info.config,
        }

    @app.post(
        "/predict",
        summary="Classify one chest X-ray",
        openapi_extra={"requestBody": _PREDICT_BODY},
        response_model=PredictAnswer,
        responses={
            400: {"model": Problem, "description": "No file in the request"},
            401: {"model": Problem, "description": "Missing or wrong API key"},
            413: {"model": Problem, "description": "Upload larger than the limit"},
            415: {"model": Problem, "description": "Not a PNG, JPEG, TIFF or DICOM file"},
            422: {"model": Problem, "description": "An image the decoders cannot read"},
            503: {
                "model": Problem,
                "description": "Queue full; retry after the Retry-After header's seconds",
            },
        },
    )
    async def predict(
        request: Request,
        explain: bool = Query(False, description="Add the Grad-CAM overlay as base64 PNG (`overlay_png`)."),
        preview: bool = Query(False, description="Add the decoded image as base64 PNG (`preview_png`)."),
    ) -> JSONResponse:
        start = time.perf_counter()
        fmt, size = "-", 0
        try:
            check_declared_length(request.headers, max_upload)
            with runner.slot():
                body = await read_body(request.stream(), max_upload)
                data = extract_upload(request.headers.get("content-type"), body, max_upload)
                del body
                fmt, size = require_format(data), len(data)
                answer = await runner.predict(data, fmt, explain=explain, preview=preview)
        except QueueFull as exc:
            return _problem(503, str(exc), start, fmt, size, headers={"Retry-After": str(exc.retry_after)})
        except UploadError as exc:
            return _problem(exc.status, exc.message, start, fmt, size)
        except ImageLoadError as exc:
            return _problem(422, f"cannot read the image: {exc.reason}", start, fmt, size)
        except CxrcaeError as exc:
            return _problem(400, str(exc), start, fmt, size)
        except ClientDisconnect:
            return _problem(400, "the client went away during the upload", start, fmt, size)
        _log(200, start, fmt, size, explain)
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    return app


def _problem(
    status: int, detail: str, start: float, fmt: str, size: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    _log(status, start, fmt, size)
    return JSONResponse(
        {"detail": detail}, status_code=status, headers={"Cache-Control": "no-store", **(headers or {})}
    )


def _log(status: int, start: float, fmt: str, size: int, explain: bool = False) -> None:
    """Request facts only: no file name, no header or tag of the image."""
    seconds = time.perf_counter() - start
    log.info("predict %d %s %d bytes%s %.3f s", status, fmt, size, " explain" if explain else "", seconds)


class RequireApiKey:
    """Refuse (401) any HTTP request that does not carry the key: ``X-API-Key``, ``Authorization: Bearer``,
    or the password of HTTP Basic, so a browser can ask for it once and send it with every request."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"detail": "missing or wrong API key (send it as X-API-Key or Authorization: Bearer KEY)"},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="cxrcae", charset="UTF-8"'},
        )
        await response(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        offered = []
        for name, value in scope.get("headers", []):
            if name == b"x-api-key":
                offered.append(value.strip())
            elif name == b"authorization":
                scheme, _, credentials = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    offered.append(credentials.strip())
                elif scheme.lower() == b"basic":
                    try:
                        offered.append(b64decode(credentials.strip(), validate=True).partition(b":")[2])
                    except (Base64Error, ValueError):
                        continue
        # compare every offer in constant time, so timing does not tell how much of a guess was right
        return any([hmac.compare_digest(candidate, self.key) for candidate in offered])


class SecurityHeaders:
    """No sniffing, no referrer; the page and its assets under a self-only Content-Security-Policy."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/static/")

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if page:
                    headers += [
                        (b"content-security-policy", PAGE_CSP.encode()),
                        (b"x-frame-options", b"DENY"),
                    ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
