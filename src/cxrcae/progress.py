"""How the core reports progress without printing: a plain callback the CLI turns into rich bars.

``report(task, done, total, info)``: ``task`` names a bar ("epoch 3 train"), ``done``/``total`` count
items (total may be None), ``info`` is a short free text such as "loss 0.0123" or "41.2 img/s".
"""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, task: str, done: int, total: int | None = None, info: str = "") -> None: ...


def no_progress(task: str, done: int, total: int | None = None, info: str = "") -> None:
    """Default reporter: does nothing."""
