"""What each benchmark task trains: its model, objective and optimiser, built as training builds them.

This is the one place the bench names the tasks whose objectives it trains (``reconstruct``, ``classify``
from ``cxrcae.tasks``) and the optimiser (``cxrcae.train.optim``, as each stage builds it), so the step it
times stays the step ``cxrcae pretrain`` and ``cxrcae finetune`` run when those change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cxrcae.errors import CxrcaeError
from cxrcae.models import CAEDecoder, CAEEncoder, ConvAutoencoder, CXRClassifier, build_head
from cxrcae.tasks import get_task
from cxrcae.train.config import FinetuneConfig
from cxrcae.train.finetuning import apply_stage
from cxrcae.train.optim import make_optimizer

TRAIN_TASKS = ("pretrain", "finetune-frozen", "finetune")
CLASS_NAMES = ("COVID", "NORMAL", "PNEUMONIA")  # the paper's three classes; speed does not depend on them
LEARNING_RATE = 1e-3


def check_task(task: str) -> None:
    if task not in TRAIN_TASKS:
        raise CxrcaeError(f"unknown benchmark task {task!r}; use one of {', '.join(TRAIN_TASKS)}")


def train_model(task: str, image_size: int) -> nn.Module:
    """The freshly initialised model of ``task``: the CAE (``pretrain``), or the LSTM-head classifier with
    its encoder frozen (``finetune-frozen``, fine-tuning's ``head`` stage) or training (``finetune``)."""
    check_task(task)
    if task == "pretrain":
        return ConvAutoencoder(CAEEncoder(), CAEDecoder())
    model = CXRClassifier(CAEEncoder(), build_head("lstm", len(CLASS_NAMES), image_size))
    if task == "finetune-frozen":
        apply_stage(model, "head")
    return model


def training_objective(task: str) -> Any:
    """The engine's objective of ``task``: ``objective(model, images, labels) -> (loss, outputs)``.

    The reconstruction objective is put past its first epoch (as a resumed run loads it), so it keeps no
    per-pixel sums for the mean-image baseline: the bench times the step of every later epoch.
    """
    check_task(task)
    if task == "pretrain":
        objective = get_task("reconstruct").objective({})
        objective.load_state({"baseline": {"note": "not computed by the bench"}})
        return objective
    return get_task("classify").objective({"class_names": list(CLASS_NAMES)})


def training_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The default optimiser (Adam) over the parameters that train, as each training stage builds it."""
    params = [p for p in model.parameters() if p.requires_grad]
    return make_optimizer(FinetuneConfig(), params, LEARNING_RATE)
