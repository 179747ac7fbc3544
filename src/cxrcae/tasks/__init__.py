"""The task registry: every task cxrcae trains, evaluates and predicts, by name (``cxrcae.tasks.base``).

Adding a task: write its module (a ``Task`` subclass and its ``Objective``), add one entry to ``TASKS`` and
its tests. config.json records ``task``; a checkpoint written before tasks existed has only ``kind`` and is
read as the task of that kind (``classifier`` -> ``classify``, ``autoencoder`` -> ``reconstruct``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cxrcae.errors import CheckpointError
from cxrcae.models.checkpoint import CONFIG_NAME
from cxrcae.models.factory import build_model as build_backbone
from cxrcae.tasks.base import Objective, Task
from cxrcae.tasks.classify import Classify
from cxrcae.tasks.multilabel import MultiLabel
from cxrcae.tasks.reconstruct import Reconstruct
from cxrcae.tasks.segment import Segment

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Reconstruct(),
        Classify(),
        MultiLabel(),
        Segment(),
    )
}
ENCODER_KIND = "encoder"
"""A bare encoder checkpoint (``cxrcae extract-encoder``) has no task: it is the reusable backbone."""


def get_task(name: str) -> Task:
    """The registered task ``name``, or a one-line error listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise CheckpointError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def task_name(config: dict[str, Any], where: str | Path = CONFIG_NAME) -> str | None:
    """The task a config.json names; an older one's from its ``kind``; None for a bare encoder."""
    if config.get("task") is not None:
        return str(config["task"])
    kind = config.get("kind")
    if kind == ENCODER_KIND:
        return None
    for task in TASKS.values():
        if task.kind == kind:
            return task.name
    kinds = ", ".join([ENCODER_KIND, *(t.kind for t in TASKS.values())])
    raise CheckpointError(f"{where}: field 'kind' must be one of {kinds} (or a 'task' named), got {kind!r}")


def task_of(config: dict[str, Any], where: str | Path = CONFIG_NAME) -> Task:
    """The task of a checkpoint's config, its own fields validated (``Task.validate_config``)."""
    name = task_name(config, where)
    if name is None:
        raise CheckpointError(f"{where}: a bare encoder checkpoint has no task; fine-tune it first")
    task = get_task(name)
    if config.get("kind", task.kind) != task.kind:
        raise CheckpointError(f"{where}: task {name!r} needs kind {task.kind!r}, got {config.get('kind')!r}")
    task.validate_config(config, where)
    return task


def build_model(config: dict[str, Any]) -> nn.Module:
    """The network of any checkpoint config: its task's, or the bare encoder."""
    if task_name(config) is None:
        return build_backbone(config)
    return task_of(config).build(config)


__all__ = ["TASKS", "Objective", "Task", "build_model", "get_task", "task_name", "task_of"]
