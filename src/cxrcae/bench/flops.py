"""FLOPs of one image's forward pass and training step, counted by PyTorch's ``FlopCounterMode``.

The count runs on a copy of the model on the ``meta`` device (shapes only: nothing is computed or
allocated) and follows the operators autograd actually dispatches, so frozen parameters (``apply_stage``)
cost their forward only, and a gradient nobody needs (the image's; a frozen encoder's features) is not
counted. FLOPs are 2 x multiply-adds of the matrix products and convolutions (``FlopCounterMode``'s
convention: a transposed convolution costs H_in*W_in*C_in*C_out*k*k multiply-adds, every input pixel
spread over a k x k window, even where Keras geometry crops the border). Biases, activations, pooling,
the loss and the optimiser update are not counted (well under 1% of the total for these models).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cxrcae.bench.workloads import train_model


@dataclass(frozen=True)
class FlopCount:
    """Per-image FLOPs of a model at one input size (see ``count_flops``)."""

    image_size: int
    forward: int
    """One forward pass of one image."""
    train: int
    """One training step per image: the forward pass plus the gradients autograd computes."""
    layers: dict[str, int]
    """Forward FLOPs of each innermost module that computes any (convolutions, LSTMs, dense layers), in
    model order. The backward pass is counted as a whole only: ``FlopCounterMode`` files backward
    operators under the wrong module around in-place activations."""


def count_flops(model: nn.Module, image_size: int, in_chans: int = 3) -> FlopCount:
    """FLOPs of ``model`` for one ``in_chans`` x ``image_size`` x ``image_size`` image: a forward pass, and a
    training step (forward, then backward from a scalar of the output; the loss itself is not counted)."""
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(1, in_chans, image_size, image_size, device="meta")
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        meta(x)
    with FlopCounterMode(display=False) as train, torch.enable_grad():
        out = meta(x)
        if out.requires_grad:  # a wholly frozen model has no backward pass
            out.float().sum().backward()
    by_module = _by_module(forward, meta)
    layers = {
        name: by_module[name]
        for name, _ in meta.named_modules()
        if name in by_module and not any(other.startswith(f"{name}.") for other in by_module)
    }
    return FlopCount(image_size, forward.get_total_flops(), train.get_total_flops(), layers)


def _by_module(counter: FlopCounterMode, root: nn.Module) -> dict[str, int]:
    """Module path (as ``named_modules`` spells it, root excluded) -> FLOPs counted inside it."""
    prefix = f"{type(root).__name__}."
    return {
        name.removeprefix(prefix): sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if name.startswith(prefix) and sum(ops.values())
    }


def train_flops(task: str, image_size: int) -> FlopCount:
    """``count_flops`` of the model of training ``task`` as the bench builds it (frozen parts included)."""
    return count_flops(train_model(task, image_size), image_size)
