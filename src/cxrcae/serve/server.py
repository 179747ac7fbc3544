"""Run the app: model loaded and socket bound before anything is announced, then uvicorn until Ctrl-C.

Loopback (127.0.0.1) is the default. Binding anywhere else is allowed but comes with a warning the CLI
prints: without ``--api-key`` anyone who can reach the port can upload images, and even with one, plain
HTTP carries the key and the images unencrypted (put a TLS reverse proxy in front). The socket is bound
here rather than by uvicorn so that a taken port is a one-line error, and so that ``--port 0`` (any free
port) can be reported.
"""

from __future__ import annotations

import copy
import ipaddress
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from cxrcae.errors import CxrcaeError
from cxrcae.serve.app import create_app
from cxrcae.serve.runner import DEFAULT_QUEUE, ModelRunner
from cxrcae.serve.uploads import DEFAULT_MAX_UPLOAD

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclass
class ServerInfo:
    """What the CLI announces once the model is loaded and the port is bound."""

    url: str
    model_id: str
    model_version: str
    device: str
    workers: int
    queue_size: int
    api_key: bool
    warnings: list[str] = field(default_factory=list)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = {info[4][0].split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def binding_warnings(host: str, api_key: str | None) -> list[str]:
    """What a user binding beyond loopback must hear before the first request arrives."""
    if is_loopback(host):
        return []
    if not api_key:
        return [
            f"listening on {host} with no authentication: anyone who can reach this port can upload images "
            "and read the predictions; pass --api-key (or set CXRCAE_API_KEY) and put a TLS proxy in front"
        ]
    return [
        f"listening on {host} over plain HTTP: the API key and the images cross the network unencrypted; "
        "put a TLS reverse proxy in front"
    ]


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (uvicorn listens on it), or a one-line error naming the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise CxrcaeError(f"cannot resolve host {host!r} ({getattr(exc, 'strerror', None) or exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CxrcaeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def log_config() -> dict[str, Any]:
    """uvicorn's logging, with cxrcae.serve's one line per prediction on the same handler, and pydicom's
    logger silenced: its messages about malformed elements may quote a value, a patient's name among them."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["cxrcae.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"]["pydicom"] = {"handlers": [], "level": "CRITICAL", "propagate": False}
    return config


def run_server(
    model: Any = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = 1,
    queue_size: int = DEFAULT_QUEUE,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    api_key: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    log_level: str = "info",
    on_ready: Callable[[ServerInfo], None] = lambda info: None,
) -> None:
    """Serve ``model`` (default: the bundled classifier) until interrupted; ``on_ready`` is called once the
    model is loaded and the port bound, just before the first request can arrive."""
    runner = ModelRunner(model, device=device, precision=precision, workers=workers, queue_size=queue_size)
    try:
        app = create_app(runner, api_key=api_key or None, max_upload=max_upload)
        sock = bind(host, port)
        try:
            config = uvicorn.Config(app, log_config=log_config(), log_level=log_level, server_header=False)
            server = uvicorn.Server(config)
            on_ready(
                ServerInfo(
                    url=url_of(sock),
                    model_id=runner.info.id,
                    model_version=runner.info.version,
                    device=str(runner.device),
                    workers=runner.workers,
                    queue_size=runner.capacity,
                    api_key=bool(api_key),
                    warnings=binding_warnings(host, api_key),
                )
            )
            with warnings.catch_warnings():  # pydicom's warnings repeat its log lines: kept out too
                warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
                server.run(sockets=[sock])
            if not server.started:
                raise CxrcaeError(f"the server on {host}:{port} did not start (see the log above)")
        finally:
            sock.close()
    finally:
        runner.close()
