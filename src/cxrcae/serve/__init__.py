"""``cxrcae serve``: a local web page and JSON API for drag-and-drop prediction with Grad-CAM heat maps.

Needs the ``serve`` extra (``pip install "cxrcae[serve]"``: FastAPI, uvicorn, python-multipart and
fastapi-offline for the docs page without a CDN). ``ModelRunner`` owns the model and the bounded queue,
``create_app`` the routes and the page (``static/``), ``run_server`` the socket and uvicorn.
"""

from cxrcae.serve.app import create_app
from cxrcae.serve.runner import ModelRunner, QueueFull
from cxrcae.serve.server import ServerInfo, binding_warnings, is_loopback, run_server

__all__ = [
    "ModelRunner",
    "QueueFull",
    "ServerInfo",
    "binding_warnings",
    "create_app",
    "is_loopback",
    "run_server",
]
