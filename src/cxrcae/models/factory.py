"""Rebuild any cxrcae model from its config.json alone (nanoGPT style: the checkpoint carries its args)."""

from __future__ import annotations

from typing import Any

from torch import nn

from cxrcae.errors import CheckpointError
from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.models.classifier import CXRClassifier
from cxrcae.models.heads import build_head

ARCHITECTURE = "cxrcae_vgg_cae"
KINDS = ("autoencoder", "classifier", "encoder")


def build_model(config: dict[str, Any]) -> nn.Module:
    """The untrained network a checkpoint's config.json describes (encoder, autoencoder or classifier)."""
    kind = config.get("kind")
    if config.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise CheckpointError(
            f"unknown architecture {config.get('architecture')!r} (expected {ARCHITECTURE})"
        )
    in_chans = int(config.get("in_chans", 3))
    if kind == "encoder":
        return CAEEncoder(in_chans)
    if kind == "autoencoder":
        return ConvAutoencoder(CAEEncoder(in_chans), CAEDecoder(in_chans))
    if kind == "classifier":
        names = config.get("class_names") or []
        if len(names) < 2:
            raise CheckpointError("classifier config.json needs at least two class_names")
        head = build_head(config.get("head", "lstm"), len(names), int(config["image_size"]))
        return CXRClassifier(CAEEncoder(in_chans), head)
    raise CheckpointError(f"config.json has kind={kind!r}; expected one of {', '.join(KINDS)}")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
