"""Optimisers by name: what a training config's ``optimizer`` field means.

The engine builds one per stage over the parameters that stage trains, so the choice is data in
config.json (and on the command line), never code in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,  # the paper's
    "adamw": torch.optim.AdamW,  # decoupled weight decay
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    ),
}


def make_optimizer(cfg: Any, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` names (Adam when the config predates the field) at ``lr``."""
    name = getattr(cfg, "optimizer", "adam")
    return OPTIMIZERS[name](list(params), lr=lr, weight_decay=getattr(cfg, "weight_decay", 0.0))
