"""Rebuild the bare encoder from its config.json (nanoGPT style: the checkpoint carries its args).

Every other model family belongs to a task, which builds it (``cxrcae.tasks``: ``build_model`` there
rebuilds any checkpoint).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cxrcae.errors import CheckpointError
from cxrcae.models.cae import CAEEncoder

ARCHITECTURE = "cxrcae_vgg_cae"


def build_model(config: dict[str, Any]) -> nn.Module:
    """The bare encoder of an ``encoder`` checkpoint; any other kind is its task's to build."""
    kind = config.get("kind")
    if config.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise CheckpointError(
            f"unknown architecture {config.get('architecture')!r} (expected {ARCHITECTURE})"
        )
    if kind == "encoder":
        return CAEEncoder(int(config.get("in_chans", 3)))
    raise CheckpointError(f"config.json has kind={kind!r}: build it with cxrcae.tasks.build_model")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
