"""Encoders by name: one resolver for every command that asks for an encoder to reuse.

A spec is one string:

=========================  ==============================================================================
``bundled``                the CAE-pretrained encoder shipped in the package (``cxrcae/weights/encoder``)
``random``                 the same CAE encoder architecture, randomly initialised (seeded)
``PATH`` or ``user/repo``  the encoder of any cxrcae checkpoint folder or Hub id (``load_encoder``)
``timm:NAME``              any timm model as a feature extractor, randomly initialised (nothing downloaded)
``timm:NAME:WEIGHTS``      the same, weights from a local ``.safetensors`` / ``.pth`` file, loaded strictly
                           (an EfficientNet file in lukemelas' key names is renamed to timm's first)
``imagenet-lite0``         ImageNet EfficientNet-Lite0 as timm's ``tf_efficientnet_lite0``, offline, from the
                           optional package of ``cxrcae[imagenet]`` (``cxrcae.hub.imagenet``)
=========================  ==============================================================================

``resolve_encoder(spec)`` returns a ``ResolvedEncoder``: the backbone (``forward_features`` gives its final
feature map) plus the preprocessing it expects (input size, resize mode, channels, mean/std), so a caller
feeds it images from the one pixel contract (``cxrcae.io``: gray in [0, 1], replicated to 3 channels) and
``ResolvedEncoder.pooled()`` does the rest. ``cae_encoder_ref(spec)`` is the narrower answer finetune needs:
which checkpoint initialises its CAE encoder (None for random).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cxrcae import bundled
from cxrcae.errors import CheckpointError, CxrcaeError, add_note
from cxrcae.hub.imagenet import (
    DISTRIBUTION,
    IMAGENET_LITE0,
    TIMM_NAME,
    imagenet_lite0,
    is_lukemelas,
    lukemelas_to_timm,
    package_version,
    weights_file,
)
from cxrcae.hub.resolve import BUNDLED_ENCODER, encoder_state, resolve_encoder_checkpoint
from cxrcae.models.cae import NUM_FEATURES, CAEEncoder
from cxrcae.models.checkpoint import load_state_strict

RANDOM = "random"
TIMM_PREFIX = "timm:"
RANDOM_ALIASES = (RANDOM, "none")
"""Spellings of "no pretraining" (finetune has long accepted ``--encoder none``)."""
DEFAULT_SIZE = 224
SPECS_HELP = (
    "bundled (the encoder shipped with cxrcae), random (same architecture, seeded init), a checkpoint "
    "folder or Hub id user/repo[@rev], timm:NAME (any timm model, random init), timm:NAME:WEIGHTS_FILE "
    "(.safetensors/.pth on disk) or imagenet-lite0 (ImageNet EfficientNet-Lite0, cxrcae[imagenet])"
)


@dataclass
class ResolvedEncoder:
    """A backbone and the preprocessing it expects; ``pooled()`` wraps both into one module."""

    spec: str
    kind: str
    """``bundled``, ``random``, ``checkpoint`` or ``timm``."""
    backbone: nn.Module
    """Has ``forward_features(x)``: (B, C, h, w) for convolutional networks (tokens (B, N, C) for ViTs)."""
    image_size: int
    """The size it was trained at (its own default for random and timm models)."""
    resize_mode: str
    """``stretch`` or ``pad``, as ``cxrcae.io.resize_xray`` takes it."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    num_features: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def pooled(self) -> PooledEncoder:
        """(B, 3, S, S) images in [0, 1] -> (B, num_features) features, globally average pooled."""
        return PooledEncoder(self.backbone, self.mean, self.std, self.in_chans)

    def describe(self) -> dict[str, Any]:
        """JSON-ready: what was used, at which input contract (written next to every result)."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_features": self.num_features,
            **self.provenance,
        }


class PooledEncoder(nn.Module):
    """Normalise, run the backbone, pool its final feature map: what a linear probe reads."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], in_chans: int):
        super().__init__()
        self.backbone = backbone
        self.in_chans = int(in_chans)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images[:, :1] if self.in_chans == 1 else images  # gray replicated: any channel is the image
        x = (x - self.mean) / self.std
        features = self.backbone.forward_features(x)
        if features.ndim == 4:
            return features.mean(dim=(2, 3))
        if hasattr(self.backbone, "forward_head"):  # tokens: the model's own pooling (class token or mean)
            return self.backbone.forward_head(features, pre_logits=True)
        return features.flatten(1)


# ---------------------------------------------------------------------------------------------- resolving


def resolve_encoder(spec: str | Path, *, seed: int = 0) -> ResolvedEncoder:
    """Turn an encoder spec (module docstring) into a backbone in eval mode on the CPU and its preprocessing.

    ``seed`` initialises ``random`` and weightless ``timm:NAME`` models without touching the global RNG.
    """
    text = str(spec).strip()
    if not text:
        raise CxrcaeError(f"empty encoder name; expected {SPECS_HELP}")
    if text.startswith(TIMM_PREFIX):
        return _timm_encoder(text, seed)
    if text.lower() == IMAGENET_LITE0 and not Path(text).exists():
        return _imagenet_lite0(text)
    if text.lower() == RANDOM and not Path(text).exists():
        return _random_cae(text, seed)
    return _checkpoint_encoder(text)


def check_encoder(spec: str | Path) -> None:
    """Fail now, in one line, on a spec that cannot resolve (an unknown timm model, a missing weights file or
    checkpoint folder, ``imagenet-lite0`` without its package), before any data is read or model built."""
    text = str(spec).strip()
    if not text:
        raise CxrcaeError(f"empty encoder name; expected {SPECS_HELP}")
    if text.startswith(TIMM_PREFIX):
        name, weights = parse_timm_spec(text)
        _check_timm_name(text, name)
        if weights is not None and not weights.is_file():
            raise CheckpointError(f"{weights}: no such weights file")
    elif text.lower() == IMAGENET_LITE0 and not Path(text).exists():
        weights_file()
    elif not (text.lower() == RANDOM and not Path(text).exists()):
        _checkpoint_folder(text)


def cae_encoder_ref(spec: str | None) -> str | None:
    """The checkpoint that initialises a CAE encoder (finetune's ``--encoder``), checked now.

    ``bundled``, a folder or a Hub id comes back as given (``encoder_state`` reads it later); ``random``
    or ``none`` mean no pretraining (None). A timm model is not the CAE architecture: refused here.
    """
    if spec is None:
        return None
    text = str(spec).strip()
    if text.lower() in RANDOM_ALIASES and not Path(text).exists():
        return None
    if text.startswith(TIMM_PREFIX) or text.lower() == IMAGENET_LITE0:
        raise CxrcaeError(
            f"{text}: fine-tuning trains the cxrcae encoder architecture; a timm model can be probed "
            "(cxrcae probe) but not used here. Use bundled, random, a checkpoint folder or a Hub id"
        )
    _checkpoint_folder(text)  # a missing folder or bundled weights fail before any data is read
    return text


def _checkpoint_folder(ref: str) -> Path:
    try:
        return resolve_encoder_checkpoint(ref)
    except CheckpointError as exc:
        if not Path(ref).expanduser().exists():
            add_note(exc, f"an encoder is one of: {SPECS_HELP}")
        raise


def _checkpoint_encoder(ref: str) -> ResolvedEncoder:
    folder = _checkpoint_folder(ref)
    state, config = encoder_state(folder)
    in_chans = int(config.get("in_chans", 3))
    encoder = CAEEncoder(in_chans)
    load_state_strict(encoder, state, f"{ref} (encoder)")
    kind = BUNDLED_ENCODER if ref == BUNDLED_ENCODER and folder == bundled.bundled_encoder() else "checkpoint"
    return ResolvedEncoder(
        spec=ref,
        kind=kind,
        backbone=encoder.eval(),
        image_size=int(config.get("image_size", DEFAULT_SIZE)),
        resize_mode=str(config.get("resize_mode", "stretch")),
        mean=tuple(float(v) for v in config.get("mean", (0.0,) * in_chans)),
        std=tuple(float(v) for v in config.get("std", (1.0,) * in_chans)),
        in_chans=in_chans,
        num_features=NUM_FEATURES,
        provenance={
            "resolved": str(folder),
            "checkpoint_kind": config.get("kind"),
            "weights_sha256": config.get("weights_sha256"),
        },
    )


def _random_cae(spec: str, seed: int) -> ResolvedEncoder:
    """The CAE architecture, seeded; the bundled encoder's input contract, so the two compare directly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CAEEncoder(3)
    size, mode = DEFAULT_SIZE, "stretch"
    shipped = bundled.bundled_encoder()
    if shipped is not None:
        config = json.loads((shipped / "config.json").read_text(encoding="utf-8"))
        size, mode = int(config.get("image_size", size)), str(config.get("resize_mode", mode))
    return ResolvedEncoder(
        spec=spec,
        kind=RANDOM,
        backbone=encoder.eval(),
        image_size=size,
        resize_mode=mode,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        in_chans=3,
        num_features=NUM_FEATURES,
        provenance={"seed": int(seed)},
    )


# ---------------------------------------------------------------------------------------------- timm


def parse_timm_spec(spec: str) -> tuple[str, Path | None]:
    """``timm:NAME`` or ``timm:NAME:WEIGHTS_FILE`` -> (name, weights file or None)."""
    _, name, weights = (spec.split(":", 2) + [""])[:3]
    name = name.strip()
    if not name:
        raise CxrcaeError(f"{spec!r}: expected timm:NAME or timm:NAME:WEIGHTS_FILE")
    return name, (Path(weights).expanduser() if weights.strip() else None)


def _timm_encoder(spec: str, seed: int) -> ResolvedEncoder:
    name, weights = parse_timm_spec(spec)
    _check_timm_name(spec, name)
    state = read_weights_file(weights) if weights is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
        if state is not None and is_lukemelas(state) and hasattr(model, "blocks"):
            state = lukemelas_to_timm(state, model)
        if state is not None:
            _fit_head(model, state)
    if state is not None:
        load_state_strict(model, state, str(weights))
    model.reset_classifier(0)  # features only: a probe or a new head reads them
    return _timm_resolved(
        spec,
        model,
        {
            "timm_model": name,
            "weights": str(weights) if weights is not None else None,
            **({} if weights is not None else {"seed": int(seed)}),
        },
    )


def _check_timm_name(spec: str, name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"
        raise CxrcaeError(f"{spec}: timm has no model {name!r}{hint}")


def _imagenet_lite0(spec: str) -> ResolvedEncoder:
    """``imagenet-lite0``: the package's ImageNet weights in ``tf_efficientnet_lite0`` (inputs to [-1, 1])."""
    model = imagenet_lite0(classifier=False)
    provenance = {
        "timm_model": TIMM_NAME,
        "weights": str(weights_file()),
        "package": f"{DISTRIBUTION}=={package_version()}",
        "pretraining": "ImageNet-1k",
    }
    return _timm_resolved(spec, model, provenance)


def _timm_resolved(spec: str, model: nn.Module, provenance: dict[str, Any]) -> ResolvedEncoder:
    """A headless timm model and the input contract of its ``pretrained_cfg``."""
    cfg = model.pretrained_cfg
    in_chans = int(cfg.get("input_size", (3,))[0])
    return ResolvedEncoder(
        spec=spec,
        kind="timm",
        backbone=model.eval(),
        image_size=int(cfg.get("input_size", (3, DEFAULT_SIZE, DEFAULT_SIZE))[-1]),
        resize_mode="stretch",
        mean=tuple(float(v) for v in cfg.get("mean", (0.0,) * in_chans)),
        std=tuple(float(v) for v in cfg.get("std", (1.0,) * in_chans)),
        in_chans=in_chans,
        num_features=int(model.num_features),
        provenance=provenance,
    )


def _fit_head(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``model`` the classifier the weights file carries (none, or another number of classes), so the
    strict load checks every backbone tensor without tripping over the head."""
    head = model.pretrained_cfg.get("classifier")
    prefix = head if isinstance(head, str) else (list(head)[0] if head else None)
    if prefix is None:
        return
    weight = state.get(f"{prefix}.weight")
    if weight is None:
        model.reset_classifier(0)
    elif weight.ndim >= 1 and int(weight.shape[0]) != int(getattr(model, "num_classes", -1)):
        model.reset_classifier(int(weight.shape[0]))


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file (tensors only: never unpickled
    beyond what ``torch.load(weights_only=True)`` allows); a ``module.`` prefix on every key is dropped."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        if path.suffix.lower() == ".safetensors":
            state: Any = load_file(str(path))
        elif path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{path}: expected a .safetensors, .pth, .pt or .bin weights file")
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read weights ({reason})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state
