"""The ``cxrcae`` command line: wiring only; every command calls one core function and renders its result."""

from cxrcae.cli.app import app, main

__all__ = ["app", "main"]
