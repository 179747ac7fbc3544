"""Local checkpoint folders: ``model.safetensors`` + ``config.json`` (+ a ``README.md`` model card).

The same folder is what goes to the Hugging Face Hub; ``cxrcae.hub.resolve`` turns a Hub id into one. Loading
is strict (missing or unexpected keys are named in the error), never unpickles anything, and checks the
weights file against the sha256 recorded in config.json, so a folder whose files come from two different saves
is refused. Every file is written to a temporary name and renamed into place, weights first and config last.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy
import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from cxrcae import __version__
from cxrcae._atomic import atomic_write_bytes, atomic_write_text
from cxrcae.errors import CheckpointError
from cxrcae.models.factory import ARCHITECTURE, build_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1

# What every model's input contract defaults to: the paper rescales pixels to [0, 1] and feeds 3 channels.
DEFAULT_PREPROCESSING = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "intensity_range": [0.0, 1.0]}


def library_versions() -> dict[str, str]:
    return {
        "cxrcae": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(
    model: nn.Module, out_dir: str | Path, config: dict[str, Any], card: str | None = None
) -> Path:
    """Save ``model`` with ``config`` (must say kind; architecture, versions and hashes are filled in)."""
    out = Path(out_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata={"format": "pt", "cxrcae": __version__, "kind": str(config.get("kind"))})
    cfg = {
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        **DEFAULT_PREPROCESSING,
        **config,
        "num_parameters": sum(v.numel() for v in state.values()),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "versions": library_versions(),
    }
    atomic_write_bytes(out / WEIGHTS_NAME, blob)
    if card is not None:
        atomic_write_text(out / CARD_NAME, card)
    atomic_write_text(out / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    return out


def read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME}; not a cxrcae checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise CheckpointError(f"{cfg_path}: not a cxrcae config (no 'kind')")
    return cfg


def read_weights(folder: Path, config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5")]
        hint = f" (found {', '.join(pickled)}: pickled/Keras weights are never loaded)" if pickled else ""
        raise CheckpointError(f"{folder}: missing {WEIGHTS_NAME}{hint}")
    blob = weights.read_bytes()
    expected = (config or {}).get("weights_sha256")
    if expected and hashlib.sha256(blob).hexdigest() != expected:
        raise CheckpointError(f"{weights}: sha256 does not match config.json (files from different saves?)")
    try:
        return load(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from None


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load every tensor or fail naming what is missing, unexpected or mis-shaped."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_folder(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a local checkpoint folder from config.json, weights loaded strictly."""
    folder = Path(folder)
    config = read_config(folder)
    model = build_model(config)
    load_state_strict(model, read_weights(folder, config), str(folder))
    return model.to(device).eval(), config


def encoder_state_of_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder's tensors (keys without the ``encoder.`` prefix) from a local folder of any kind."""
    folder = Path(folder)
    config = read_config(folder)
    state = read_weights(folder, config)
    if config["kind"] == "encoder":
        return state, config
    enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    if not enc:
        raise CheckpointError(f"{folder}: no encoder weights found in the checkpoint")
    return enc, config
