"""Early stopping on a validation loss, as a small serialisable state (it travels in the resume state)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta`` (Keras semantics).

    ``best`` may start from a previous stage's best value, so a later stage that never beats it ends with
    the earlier weights restored.
    """

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; True when it is a new best (the caller then saves weights)."""
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.stopped = True
        return False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["best"] = None if math.isinf(self.best) else self.best
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EarlyStopping:
        values = dict(data)
        values["best"] = math.inf if values.get("best") is None else float(values["best"])
        return cls(**values)
