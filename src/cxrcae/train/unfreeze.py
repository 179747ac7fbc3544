"""Gradual unfreezing: which parameters a fine-tuning stage trains, and a train mode that respects it.

Stages (``--stages``, comma-separated, run in order):

- ``head``: the encoder is frozen (no gradients, eval mode, not in the optimizer); only the head trains.
- ``conv6`` ... ``conv2``: the head plus encoder blocks from that convolution to the top (ULMFiT style).
- ``all``: every parameter trains (plain fine-tuning when used alone).
- ``gradual``: shorthand for ``conv6,conv5,conv4,conv3,conv2,all`` (one more block per stage, from the top).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cxrcae.errors import CxrcaeError

ENCODER_BLOCKS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6")
GRADUAL = ("conv6", "conv5", "conv4", "conv3", "conv2", "all")
STAGE_NAMES = ("head", *reversed(ENCODER_BLOCKS[1:]), "all")


def expand_stages(stages: Sequence[str] | str) -> tuple[str, ...]:
    """Validate ``--stages`` and expand ``gradual``; raises ``CxrcaeError`` on unknown names."""
    if isinstance(stages, str):
        stages = [s for s in stages.replace(" ", "").split(",") if s]
    out: list[str] = []
    for name in stages:
        name = name.strip().lower()
        if name == "gradual":
            out += GRADUAL
        elif name in STAGE_NAMES:
            out.append(name)
        else:
            raise CxrcaeError(f"unknown stage {name!r}; use {', '.join(STAGE_NAMES)} or gradual")
    if not out:
        raise CxrcaeError("--stages needs at least one stage (e.g. head,all)")
    return tuple(out)


def trainable_blocks(stage: str) -> tuple[str, ...]:
    """Encoder blocks a stage trains (the head always trains)."""
    if stage == "head":
        return ()
    if stage == "all":
        return ENCODER_BLOCKS
    return ENCODER_BLOCKS[ENCODER_BLOCKS.index(stage) :]


def apply_stage(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` on a ``CXRClassifier``; returns the parameters to optimise."""
    blocks = set(trainable_blocks(stage))
    for name, param in model.named_parameters():
        if name.startswith("encoder."):
            block = name.split(".")[2]  # encoder.stages.convN.weight
            param.requires_grad_(block in blocks)
        else:
            param.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, then every module whose parameters are all frozen goes back to eval mode.

    A frozen encoder must behave exactly as at inference (dropout/normalisation layers, if any, must not
    update or randomise), so "frozen" means both no gradient and eval mode.
    """
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
    return model


def unfreeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(True)
