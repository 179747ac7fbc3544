"""Resume state in OUT/last/: weights, optimizer, early stopping, history and RNG states — no pickle.

Layout of OUT/last/ (written after every epoch):

- ``model.safetensors`` + ``config.json``: the current (not best) weights, a loadable checkpoint folder.
- ``state.safetensors``: every tensor of the optimizer state (``optimizer.<param>.<name>``), the torch
  RNG states (``rng.torch``, ``rng.cuda.<i>``) and the best weights so far (``best.<key>``), so resuming
  never depends on OUT/best having been written in step with OUT/last.
- ``state.json``: everything else — run kind, data provenance, settings, stage/epoch position, early
  stopping, history, optimizer param groups and scalars, Python/NumPy RNG states, and the sha256 of the
  two weight files so a mixed folder is refused.

The folder is written as ``.last-tmp`` and swapped in with renames, so a crash leaves either the previous
or the new state, never half of one: ``find_resume_folder`` takes the newest complete one and
``recover_resume_folder`` (run under the run's lock before resuming) puts it back in place. A write that
fails (full disk, read-only folder) removes its half-written ``.last-tmp`` and leaves OUT/last as it was.
The first state is written before the first epoch (position 0: initial weights, no optimizer state yet), so
a run interrupted at any moment can be resumed.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save
from torch import nn

from cxrcae._atomic import WriteError, atomic_write_bytes, atomic_write_text
from cxrcae.errors import CheckpointError
from cxrcae.models.checkpoint import read_weights, save_checkpoint

LAST = "last"
_TMP = ".last-tmp"
_OLD = ".last-old"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STATE_VERSION = 1


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-ready values (None: none)."""
    if optimizer is None:
        return {}, None
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_to_flat``: a state dict ``optimizer.load_state_dict`` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_resume_state(
    out_dir: Path,
    model: nn.Module,
    model_config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    payload: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write OUT/last/ (see module docstring); ``payload`` is the JSON part (position, history, ...).

    ``extra_tensors`` (e.g. the best weights so far as ``best.<key>``) go into state.safetensors;
    ``optimizer`` is None before the first epoch. On failure nothing half-written is left and OUT/last is
    unchanged.
    """

    out_dir = Path(out_dir)
    tmp, old, last = out_dir / _TMP, out_dir / _OLD, out_dir / LAST
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(model, tmp, model_config)
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        rng_tensors, rng_meta = capture_rng()
        extra = {k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()}
        blob = save({**opt_tensors, **rng_tensors, **extra}, metadata={"format": "pt"})
        atomic_write_bytes(tmp / STATE_TENSORS, blob)
        weights_sha = json.loads((tmp / "config.json").read_text("utf-8"))["weights_sha256"]
        state = {
            "state_version": STATE_VERSION,
            **payload,
            "optimizer": opt_meta,
            "rng": rng_meta,
            "weights_sha256": weights_sha,
            "state_sha256": hashlib.sha256(blob).hexdigest(),
        }
        atomic_write_text(tmp / STATE_JSON, json.dumps(state, indent=1) + "\n")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk: name what could not be saved, not its temporary
            raise WriteError(last, exc) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if last.exists():
        last.rename(old)
    tmp.rename(last)
    shutil.rmtree(old, ignore_errors=True)
    return last


def _complete(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file()  # state.json is written last


def find_resume_folder(out_dir: Path) -> Path:
    """The newest complete resume state: a finished ``.last-tmp`` (a swap cut short) is newer than OUT/last,
    which is newer than ``.last-old``."""
    out_dir = Path(out_dir)
    for name in (_TMP, LAST, _OLD):
        if _complete(out_dir / name):
            return out_dir / name
    raise CheckpointError(f"{out_dir}: no resume state found (expected {LAST}/{STATE_JSON})")


def recover_resume_folder(out_dir: Path) -> Path:
    """Finish or undo a swap a killed process left half done, so that OUT/last is the newest complete
    state and no ``.last-tmp``/``.last-old`` remains. Only while holding the run's lock."""
    out_dir = Path(out_dir)
    tmp, old, last = out_dir / _TMP, out_dir / _OLD, out_dir / LAST
    newest = find_resume_folder(out_dir)
    if newest != last:
        shutil.rmtree(last, ignore_errors=True)  # older than ``newest``, or never finished
        newest.rename(last)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    return last


def saved_epoch(out_dir: Path) -> int | None:
    """The epoch the newest resume state in ``out_dir`` ends with (0: before the first), or None."""
    try:
        folder = find_resume_folder(out_dir)
        return int(json.loads((folder / STATE_JSON).read_text("utf-8"))["epoch"])
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        return None


def load_resume_state(out_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(state.json, state tensors, model weights) from OUT/last, after checking they belong together."""

    folder = find_resume_folder(out_dir)
    try:
        state = json.loads((folder / STATE_JSON).read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / STATE_JSON}: invalid JSON ({exc})") from None
    if state.get("state_version") != STATE_VERSION:
        raise CheckpointError(f"{folder}: resume state version {state.get('state_version')} is not supported")
    blob = (folder / STATE_TENSORS).read_bytes() if (folder / STATE_TENSORS).is_file() else b""
    if hashlib.sha256(blob).hexdigest() != state["state_sha256"]:
        raise CheckpointError(f"{folder}: {STATE_TENSORS} missing or does not match {STATE_JSON}")
    weights = read_weights(folder, {"weights_sha256": state["weights_sha256"]})
    return state, load(blob), weights
