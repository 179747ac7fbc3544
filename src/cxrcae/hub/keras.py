"""Convert the authors' Keras .h5 models (``cae.h5``, ``covid_classification.h5``) into cxrcae checkpoints.

Read with h5py alone (no TensorFlow). Weights are taken from the file's ``model_weights`` groups in layer
order (nested encoder/decoder models are walked in order too) and grouped into layers: each layer's tensors
start with its ``kernel``. The architecture is the paper's, so the layers are recognised by position and
shape: six 4-D kernels are the encoder, further 4-D kernels the decoder, then LSTMs (kernel,
recurrent_kernel, bias) and Dense layers make the classification head. Layouts:

- Conv2D kernel (H, W, in, out) -> PyTorch (out, in, H, W).
- Conv2DTranspose kernel (H, W, out, in) -> PyTorch ConvTranspose2d (in, out, H, W); both frameworks compute
  the transpose of the same cross-correlation, so no spatial flip (checked numerically in the tests).
- LSTM kernel (in, 4u) / recurrent_kernel (u, 4u), gate order i, f, c, o (PyTorch: i, f, g, o - the same)
  -> weight_ih (4u, in) / weight_hh (4u, u); Keras' single bias -> bias_ih, zeros -> bias_hh (a CuDNNLSTM
  bias of 8u is split into both).
- Dense kernel (in, out) -> Linear (out, in). Flatten after the LSTM is sequence-major, which is the order
  of cxrcae's feature tokens, so the first Dense layer needs no permutation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from cxrcae._atomic import atomic_write_text
from cxrcae.errors import CheckpointError
from cxrcae.hub.card import build_card
from cxrcae.hub.resolve import load_checkpoint
from cxrcae.io.resize import RESIZE_MODES
from cxrcae.models.cae import DECODER_CHANNELS, ENCODER_CHANNELS, REDUCTION
from cxrcae.models.checkpoint import load_state_strict, save_checkpoint
from cxrcae.models.heads import HEADS, build_head
from cxrcae.tasks import build_model

N_ENCODER = len(ENCODER_CHANNELS)
N_DECODER = len(DECODER_CHANNELS) + 1

# How the authors prepared images for each kind of model: pad for CAE pretraining, stretch for the classifier.
AUTHORS_RESIZE_MODE = {"autoencoder": "pad", "encoder": "pad", "classifier": "stretch"}


@dataclass
class KerasLayer:
    """One layer's tensors, by their short names (kernel, recurrent_kernel, bias)."""

    name: str
    arrays: dict[str, np.ndarray]

    @property
    def type(self) -> str:
        keys = set(self.arrays)
        kernel = self.arrays.get("kernel")
        if kernel is None:
            return "unknown"
        if "recurrent_kernel" in keys:
            return "lstm"
        if kernel.ndim == 4:
            return "conv"
        if kernel.ndim == 2:
            return "dense"
        return "unknown"


@dataclass
class KerasFile:
    layers: list[KerasLayer]
    model_config: dict[str, Any] | None
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class ImportResult:
    out: Path
    kind: str
    config: dict[str, Any]
    layers: int
    head: str | None = None


def _attr_list(group: Any, name: str) -> list[str]:
    """An h5 attribute list, including Keras' chunked form (name0, name1, ...) for long lists."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values += list(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def read_keras_h5(path: str | Path) -> KerasFile:
    """Every weight tensor of a Keras .h5 (full model or weights-only file), grouped into layers in order."""

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        layer_names = _attr_list(root, "layer_names")
        if not layer_names:
            raise CheckpointError(f"{path}: no Keras layer weights found (no 'layer_names' attribute)")
        named: list[tuple[str, np.ndarray]] = []
        for layer in layer_names:
            group = root[layer]
            for weight in _attr_list(group, "weight_names"):
                named.append((f"{layer}/{weight}", np.asarray(group[weight], dtype=np.float32)))
        attrs = {
            k: (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in f.attrs.items()
            if k != "model_config"
        }
        raw = f.attrs.get("model_config")
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else None
    layers: list[KerasLayer] = []
    for full, array in named:
        short = _short(full)
        if short == "kernel" or not layers or short in layers[-1].arrays:
            layers.append(KerasLayer(full.rsplit("/", 1)[0], {}))
        layers[-1].arrays[short] = array
    return KerasFile(layers, config, attrs)


def _input_size(config: dict[str, Any] | None) -> int | None:
    """The square input side declared in model_config (batch_input_shape / batch_shape), if any."""
    stack: list[Any] = [config]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            for key in ("batch_input_shape", "batch_shape"):
                shape = node.get(key)
                if isinstance(shape, list) and len(shape) == 4 and shape[1] and shape[1] == shape[2]:
                    return int(shape[1])
            stack += list(node.values())
        elif isinstance(node, list):
            stack += node
    return None


# ----------------------------------------------------------------------------------------------- conversion


def _conv(layer: KerasLayer) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = layer.arrays["kernel"]
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))), torch.from_numpy(
        layer.arrays["bias"]
    )


def _lstm(layer: KerasLayer) -> dict[str, torch.Tensor]:
    kernel, recurrent, bias = (
        layer.arrays["kernel"],
        layer.arrays["recurrent_kernel"],
        layer.arrays.get("bias"),
    )
    units = recurrent.shape[0]
    if bias is None:
        bias = np.zeros(4 * units, np.float32)
    if bias.shape == (8 * units,):  # CuDNNLSTM: input and recurrent biases
        b_ih, b_hh = bias[: 4 * units], bias[4 * units :]
    elif bias.shape == (4 * units,):
        b_ih, b_hh = bias, np.zeros_like(bias)
    else:
        raise CheckpointError(f"LSTM layer {layer.name}: unexpected bias shape {bias.shape}")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return {
        "weight_ih_l0": t(kernel.T),
        "weight_hh_l0": t(recurrent.T),
        "bias_ih_l0": t(b_ih),
        "bias_hh_l0": t(b_hh),
    }


def _check_encoder(layers: list[KerasLayer]) -> None:
    prev = 3
    for i, (layer, ch) in enumerate(zip(layers, ENCODER_CHANNELS), start=1):
        expected = (3, 3, prev, ch)
        got = layer.arrays["kernel"].shape
        if layer.type != "conv" or got != expected:
            raise CheckpointError(
                f"layer {i} ({layer.name}): expected the paper's Conv2D kernel {expected}, got {got}"
            )
        prev = ch


def keras_state_dict(
    keras: KerasFile, image_size: int | None = None
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(kind, PyTorch state dict, config fields: head/image_size/n_classes) for the paper's architecture."""
    layers = [layer for layer in keras.layers if layer.arrays]
    if len(layers) < N_ENCODER or any(layer.type == "unknown" for layer in layers):
        names = ", ".join(f"{layer.name}:{sorted(layer.arrays)}" for layer in layers[:8])
        raise CheckpointError(f"not the paper's architecture: expected 6 Conv2D layers first, found {names}")
    _check_encoder(layers[:N_ENCODER])
    rest = layers[N_ENCODER:]
    fields: dict[str, Any] = {}
    if not rest:
        kind, prefix = "encoder", ""
    elif all(layer.type == "conv" for layer in rest):
        kind, prefix = "autoencoder", "encoder."
    else:
        kind, prefix = "classifier", "encoder."
    state: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers[:N_ENCODER], start=1):
        state[f"{prefix}stages.conv{i}.weight"], state[f"{prefix}stages.conv{i}.bias"] = _conv(layer)
    if kind == "autoencoder":
        if len(rest) != N_DECODER:
            raise CheckpointError(f"expected {N_DECODER} Conv2DTranspose decoder layers, found {len(rest)}")
        for i, layer in enumerate(rest, start=1):
            state[f"decoder.stages.deconv{i}.weight"], state[f"decoder.stages.deconv{i}.bias"] = _conv(layer)
        fields["image_size"] = image_size or _input_size(keras.model_config) or 224
    elif kind == "classifier":
        head_state, fields = _head_state(rest, image_size)
        state.update(head_state)
    else:
        fields["image_size"] = image_size or _input_size(keras.model_config) or 224
    return kind, state, fields


def _head_state(
    layers: list[KerasLayer], image_size: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:

    lstms = [layer for layer in layers if layer.type == "lstm"]
    denses = [layer for layer in layers if layer.type == "dense"]
    order = ["lstm"] * len(lstms) + ["dense"] * len(denses)
    if [layer.type for layer in layers] != order or not denses:
        raise CheckpointError("classification head must be LSTM layer(s) then Dense layers, as in the paper")
    n_classes = denses[-1].arrays["kernel"].shape[1]
    width = lstms[-1].arrays["recurrent_kernel"].shape[0] if lstms else ENCODER_CHANNELS[-1]
    tokens, rem = divmod(denses[0].arrays["kernel"].shape[0], width)
    side = math.isqrt(tokens)
    if rem or side * side != tokens:
        raise CheckpointError(
            f"first Dense layer input {denses[0].arrays['kernel'].shape[0]} is not h*w*{width}"
        )
    if image_size is not None and image_size != side * REDUCTION:
        raise CheckpointError(
            f"the head was trained on {side}x{side} tokens ({side * REDUCTION} px images), not {image_size}"
        )
    image_size = side * REDUCTION
    state: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(lstms):
        state.update({f"head.lstm.layers.{j}.{k}": v for k, v in _lstm(layer).items()})
    for name in HEADS:
        head = build_head(name, n_classes, image_size)
        linear = [k for k, m in head.named_modules() if isinstance(m, torch.nn.Linear)]
        candidate = dict(state)
        if len(linear) != len(denses):
            continue
        for key, layer in zip(linear, denses):
            candidate[f"head.{key}.weight"] = torch.from_numpy(np.ascontiguousarray(layer.arrays["kernel"].T))
            candidate[f"head.{key}.bias"] = torch.from_numpy(layer.arrays["bias"])
        own = {f"head.{k}": v.shape for k, v in head.state_dict().items()}
        got = {k: v.shape for k, v in candidate.items()}
        if own == got:
            return candidate, {"head": name, "image_size": image_size, "n_classes": n_classes}
    sizes = [layer.arrays["recurrent_kernel"].shape[0] for layer in lstms]
    dense_sizes = [layer.arrays["kernel"].shape[1] for layer in denses]
    raise CheckpointError(
        f"head LSTM{sizes} + Dense{dense_sizes} matches none of the heads: {', '.join(HEADS)}"
    )


def import_keras(
    path: str | Path,
    out_dir: str | Path,
    *,
    class_names: list[str] | None = None,
    image_size: int | None = None,
    resize_mode: str | None = None,
) -> ImportResult:
    """Convert ``path`` into a strict cxrcae checkpoint folder (+ model card) at ``out_dir``.

    ``resize_mode`` defaults to what the authors did for that kind of model: ``pad`` (letterbox) for the
    autoencoder and its encoder, which they pretrained on padded images, ``stretch`` for the classifier.
    """
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise CheckpointError(f"unknown resize mode {resize_mode!r}; choose {' or '.join(RESIZE_MODES)}")
    if class_names is not None and (len(set(class_names)) != len(class_names) or not all(class_names)):
        raise CheckpointError(f"class names must be distinct and non-empty, got {class_names}")

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    keras = read_keras_h5(path)
    kind, state, fields = keras_state_dict(keras, image_size)
    config: dict[str, Any] = {
        "kind": kind,
        "image_size": int(fields["image_size"]),
        "in_chans": 3,
        "resize_mode": resize_mode or AUTHORS_RESIZE_MODE[kind],
    }
    if kind == "classifier":
        n = int(fields["n_classes"])
        names = class_names or [f"class_{i}" for i in range(n)]
        if len(names) != n:
            raise CheckpointError(f"the model has {n} outputs but {len(names)} class names were given")
        config.update(head=fields["head"], class_names=list(names), class_names_known=bool(class_names))
    config["source"] = {
        "format": "keras-h5",
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        **{k: keras.attrs[k] for k in ("keras_version", "backend") if k in keras.attrs},
    }
    model = build_model(config)
    load_state_strict(model, state, str(path))
    out = save_checkpoint(model, out_dir, config)
    _, saved = load_checkpoint(out)  # what a user will load: round-trip it once
    atomic_write_text(out / "README.md", build_card(saved))
    return ImportResult(out=out, kind=kind, config=saved, layers=len(keras.layers), head=config.get("head"))
