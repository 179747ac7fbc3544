"""What a task is: the one place that knows how a model's outputs are trained, scored and read.

The engine, evaluate, predict, export and the Hub never ask "is this a classifier?": they take the task named
by the checkpoint's config.json (``task``; older checkpoints have only ``kind`` and are read as the task whose
``kind`` it is) and call it. A task declares:

- ``kind``: the model family written into config.json (``classifier``, ``autoencoder``, ...), which the
  checkpoint loader uses to know what tensors to expect;
- ``build(config)``: the network (encoder + head or decoder) rebuilt from config.json alone;
- ``validate_config(config, where)``: refuse, in one line naming the field, what this task needs and lacks;
- ``objective(config, **options)``: the training loss and its validation metrics (an ``Objective``);
- ``probabilities(outputs, config)``: how raw outputs become what users read (class probabilities,
  per-label probabilities, masks), calibration included;
- ``metric_names``: the validation metrics it reports each epoch (the training table shows them);
- ``card_summary(config)``: the sentence the model card says about what the model predicts.

A new task is one module with a ``Task`` subclass, one line in ``cxrcae.tasks.TASKS``, and its tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from cxrcae.errors import CheckpointError


class EpochOutputs(Protocol):
    """What ``validate`` hands an objective after an epoch: the mean loss and what it observed."""

    loss: float
    images: int


class Objective:
    """A task's training loss and validation metrics, with the state a resumed run needs.

    ``__call__(model, images, targets)`` returns (fp32 loss, outputs). During validation the engine calls
    ``observe(outputs, targets)`` for every batch, then ``epoch_metrics(stats)`` once; metrics are named
    ``val_*`` and land in history.csv, the best checkpoint's config.json and the progress line.
    """

    name = "loss"
    monitor_metrics: Sequence[str] = ()
    """The ``val_*`` metrics shown in the progress line (the first one) and the training table."""

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        raise NotImplementedError

    def start_validation(self) -> None:
        """Called before a validation pass: forget what the previous one observed."""

    def observe(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One validation batch's outputs and targets (no gradients)."""

    def epoch_metrics(self, stats: EpochOutputs) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class Task:
    """Base class of the registered tasks (``cxrcae.tasks.TASKS``); see the module docstring."""

    name: str = ""
    kind: str = ""
    description: str = ""
    labelled: bool = True
    """Whether training needs labels (reconstruction does not)."""
    metric_names: tuple[str, ...] = ()

    def build(self, config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def validate_config(self, config: dict[str, Any], where: str | Path) -> None:
        """Task-specific fields of config.json (the common ones are checked by ``models.checkpoint``)."""

    def objective(self, config: dict[str, Any], **options: Any) -> Objective:
        raise NotImplementedError

    def probabilities(self, outputs: torch.Tensor | np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """What users read from raw model outputs; the base task returns them as they are."""
        return _numpy(outputs)

    def card_summary(self, config: dict[str, Any]) -> str:
        return self.description

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def _numpy(outputs: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float().cpu().numpy()
    return np.asarray(outputs)


def check_class_names(
    config: dict[str, Any], where: str | Path, key: str, least: int, most: int
) -> list[str]:
    """``config[key]`` as a list of ``least``..``most`` distinct non-empty names, or a one-line error."""
    names = config.get(key)
    ok = isinstance(names, list) and least <= len(names) <= most
    ok = ok and all(isinstance(n, str) and 0 < len(n) <= 200 for n in names)
    if not ok or len(set(names)) != len(names):
        shown = repr(names)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise CheckpointError(
            f"{where}: field {key!r} must list {least} to {most} distinct names, got {shown}"
        )
    return list(names)
