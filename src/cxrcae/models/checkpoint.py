"""Local checkpoint folders: ``model.safetensors`` + ``config.json`` (+ a ``README.md`` model card).

The same folder is what goes to the Hugging Face Hub; ``cxrcae.hub.resolve`` turns a Hub id into one. Loading
is strict (missing or unexpected keys are named in the error), never unpickles anything, and checks the
weights file against the sha256 recorded in config.json, so a folder whose files come from two different saves
is refused. A save writes every file under a temporary name first and renames them (weights first, config
last) only once all are on disk, so a full disk or a read-only folder leaves the previous checkpoint intact.

A checkpoint may come from anyone (a Hub repo, a shared drive), so reading one is bounded and checked before
anything is built from it: config.json is read up to ``CONFIG_MAX_BYTES`` and its fields are validated
(``validate_config``: the fields cxrcae uses must be present where required, of the right type and within
range; fields it does not know are ignored, never interpreted); a file of the folder that is a symlink to
somewhere outside it (other than a Hub cache snapshot's own blobs) or not a regular file is refused; the
weights file may be no larger than the model config.json describes needs (so nothing beyond that is read),
and its safetensors header (at most ``HEADER_MAX_BYTES``) must describe exactly that model's tensors, names,
shapes and dtypes, lying inside the file: a header that claims terabytes or tensors of the wrong shape or
dtype is refused before any tensor is built.

A classifier's folder may also hold its out-of-distribution guard (``GUARD_NAME``), named with its own sha256
by the ``ood`` block of config.json; ``read_guard`` reads it with the same checks. What the guard is and does
is ``cxrcae.ood``'s; this module only keeps the folder's files consistent.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from cxrcae import __version__
from cxrcae._atomic import atomic_write_many
from cxrcae.errors import CheckpointError
from cxrcae.io.resize import RESIZE_MODES
from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.models.factory import ARCHITECTURE

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
GUARD_NAME = "ood.safetensors"
"""The out-of-distribution guard's weights (``cxrcae.ood``), beside a classifier's own when config.json has
an ``ood`` block (``GUARD_BLOCK``); Hub transfers move it with the model."""
GUARD_BLOCK = "ood"
FORMAT_VERSION = 1

# What every model's input contract defaults to: the paper rescales pixels to [0, 1] and feeds 3 channels.
DEFAULT_PREPROCESSING = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "intensity_range": [0.0, 1.0]}

CONFIG_MAX_BYTES = 16 * 2**20
"""config.json is a few kB; anything beyond 16 MiB is not one (and is never read past that)."""
HEADER_MAX_BYTES = 100 * 2**20
"""The safetensors format's own limit on its JSON header."""
MAX_IMAGE_SIZE = 4096
KIND_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,39}")
"""A model family's name (``classifier``, ``autoencoder``, ``encoder``, a task's own); which families exist
is the task registry's business (``cxrcae.tasks``), not this module's."""
_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# what a tensor of each dtype may be stored as: fp32 weights in half precision (the bundled model is),
# never as integers or wider floats
_STORABLE = {"F32": ("F32", "F16", "BF16"), "F16": ("F16",), "BF16": ("BF16",), "I64": ("I64",)}
_TORCH_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


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
    blob = _sorted_metadata(
        save(state, metadata={"format": "pt", "cxrcae": __version__, "kind": str(config.get("kind"))})
    )
    cfg = {
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        **DEFAULT_PREPROCESSING,
        **config,
        "num_parameters": sum(v.numel() for v in state.values()),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "versions": library_versions(),
    }
    files = {out / WEIGHTS_NAME: blob}
    if card is not None:
        files[out / CARD_NAME] = card.encode("utf-8")
    files[out / CONFIG_NAME] = (json.dumps(cfg, indent=2, sort_keys=False) + "\n").encode("utf-8")
    atomic_write_many(files)  # all written before any is renamed: a failed save keeps the old folder whole
    return out


def _sorted_metadata(blob: bytes) -> bytes:
    """``blob`` with its ``__metadata__`` keys in sorted order: safetensors writes them in a per-process
    random order, and the same weights must give the same file (and sha256) in every run."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


# ----------------------------------------------------------------------------------------------- reading


def member(folder: Path, name: str, limit: int) -> Path:
    """``folder/name`` when it is safe to read: a regular file of at most ``limit`` bytes, inside the folder.

    A symlink is followed only when it stays in the folder, or, for a Hub cache snapshot
    (``snapshots/<commit>/``), in that repo's ``blobs/``; anything else (a link to /etc, to another
    user's files, to /dev/zero, a FIFO) is refused before it is opened."""
    path = folder / name
    if path.is_symlink():
        target = path.resolve()
        allowed = [folder.resolve()]
        if folder.parent.name == "snapshots":
            allowed.append((folder.parent.parent / "blobs").resolve())
        if not any(target.is_relative_to(place) for place in allowed):
            raise CheckpointError(
                f"{path}: is a symlink to {target}, outside the checkpoint folder; refused "
                "(copy the file into the folder instead)"
            )
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a broken symlink?)") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file; refused")
    if info.st_size > limit:
        raise CheckpointError(f"{path}: {info.st_size:,} bytes, more than the {limit:,} allowed; refused")
    return path


def _loads(text: bytes, where: Path, what: str) -> Any:
    try:
        return json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: invalid {what} ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: invalid {what} (nested too deeply)") from None


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, bounded (``CONFIG_MAX_BYTES``), validated (``validate_config``)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not (cfg_path.exists() or cfg_path.is_symlink()):
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME}; not a cxrcae checkpoint folder")
    cfg_path = member(folder, CONFIG_NAME, CONFIG_MAX_BYTES)
    with open(cfg_path, "rb") as f:
        data = f.read(CONFIG_MAX_BYTES + 1)
    if len(data) > CONFIG_MAX_BYTES:  # it grew after the size check
        raise CheckpointError(f"{cfg_path}: more than {CONFIG_MAX_BYTES:,} bytes; refused")
    cfg = _loads(data, cfg_path, "JSON")
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise CheckpointError(f"{cfg_path}: not a cxrcae config (no 'kind')")
    validate_config(cfg, cfg_path)
    return cfg


def model_temperature(config: dict[str, Any]) -> float:
    """The temperature a checkpoint asks for (1.0 when never calibrated)."""
    value = config.get("temperature", 1.0)
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json temperature must be a number, got {value!r}") from None
    if not (t > 0 and math.isfinite(t)):
        raise CheckpointError(f"config.json temperature must be a positive number, got {value!r}")
    return t


def _fail(where: Path, field: str, problem: str, value: Any) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{where}: field {field!r} {problem}, got {shown}")


def _int_field(cfg: dict, key: str, where: Path, lo: int, hi: int, required: bool = False) -> None:
    if key not in cfg:
        if required:
            raise CheckpointError(f"{where}: missing field {key!r}")
        return
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _fail(where, key, f"must be a whole number from {lo} to {hi}", value)


def _text_field(cfg: dict, key: str, where: Path, choices: tuple[str, ...], required: bool = False) -> None:
    if key not in cfg or (cfg[key] is None and not required):
        if required:
            raise CheckpointError(f"{where}: missing field {key!r}")
        return
    if not isinstance(cfg[key], str) or cfg[key] not in choices:
        raise _fail(where, key, f"must be one of {', '.join(choices)}", cfg[key])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers_field(cfg: dict, key: str, where: Path, lengths: range, positive: bool = False) -> None:
    if key not in cfg:
        return
    value = cfg[key]
    ok = isinstance(value, list) and len(value) in lengths and all(_number(v) for v in value)
    if not ok or (positive and any(v <= 0 for v in value)):
        sign = "positive " if positive else ""
        count = f"{lengths.start}" if len(lengths) == 1 else f"{lengths.start} to {lengths.stop - 1}"
        raise _fail(where, key, f"must be a list of {count} finite {sign}numbers", value)


def validate_config(cfg: dict[str, Any], where: str | Path = CONFIG_NAME) -> None:
    """Refuse, in one line naming the field, a config.json whose common fields are missing (where
    required), of the wrong type or out of range (a task checks its own: ``Task.validate_config``).
    Fields cxrcae does not know are left alone: they are never interpreted, and refusing them would refuse
    checkpoints from newer versions for no reason."""
    where = Path(where)
    kind = cfg.get("kind")
    if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
        raise _fail(where, "kind", "must be a model family name such as 'classifier'", kind)
    task = cfg.get("task")
    if task is not None and not (isinstance(task, str) and KIND_PATTERN.fullmatch(task)):
        raise _fail(where, "task", "must be a task name such as 'classify'", task)
    if cfg.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise _fail(where, "architecture", f"must be {ARCHITECTURE!r}", cfg.get("architecture"))
    _int_field(cfg, "format_version", where, 1, FORMAT_VERSION)
    _int_field(cfg, "in_chans", where, 1, 4)
    _int_field(cfg, "image_size", where, 32, MAX_IMAGE_SIZE)
    if cfg.get("image_size", 32) % 32:
        raise _fail(where, "image_size", "must be a multiple of 32", cfg["image_size"])
    _text_field(cfg, "resize_mode", where, RESIZE_MODES)
    _numbers_field(cfg, "mean", where, range(1, 5))
    _numbers_field(cfg, "std", where, range(1, 5), positive=True)
    _numbers_field(cfg, "intensity_range", where, range(2, 3))
    sha = cfg.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _fail(where, "weights_sha256", "must be 64 hex digits", sha)
    if "temperature" in cfg and not (_number(cfg["temperature"]) and cfg["temperature"] > 0):
        raise _fail(where, "temperature", "must be a positive number", cfg["temperature"])


Builder = Callable[[dict[str, Any]], nn.Module]
"""Rebuilds a model from its config.json: ``cxrcae.tasks.build_model``, which knows every task's network
(this layer does not: tasks sit above it)."""


def expected_tensors(config: dict[str, Any], build: Builder) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every tensor the model of ``config`` holds (built on the
    meta device: no memory is allocated, whatever size the config asks for)."""
    with torch.device("meta"):
        model = build(config)
    state = model.state_dict()
    return {k: (tuple(v.shape), _TORCH_DTYPES.get(v.dtype, str(v.dtype))) for k, v in state.items()}


def _check_header(
    header: Any, data_size: int, where: Path, expected: dict[str, tuple[tuple[int, ...], str]] | None
) -> None:
    """Every tensor entry well formed, inside the file and contiguous; names, shapes, dtypes as expected."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a safetensors file (header is not an object)")
    header = {k: v for k, v in header.items() if k != "__metadata__"}
    spans, shapes = [], {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ints = [*shape, start, end]
            if dtype not in _SAFETENSORS_DTYPES or not all(type(v) is int and v >= 0 for v in ints):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{where}: malformed safetensors entry for {name!r}") from None
        if end > data_size or end - start != math.prod(shape) * _SAFETENSORS_DTYPES[dtype]:
            raise CheckpointError(
                f"{where}: tensor {name!r} claims bytes {start}-{end} of a {data_size:,}-byte data section; "
                "refused"
            )
        spans.append((start, end))
        shapes[name] = (tuple(shape), dtype)
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise CheckpointError(f"{where}: tensors overlap or leave gaps; not a valid safetensors file")
        position = end
    if position != data_size:
        raise CheckpointError(f"{where}: {data_size - position} bytes after the last tensor; refused")
    if expected is None:
        return
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{k} {shapes[k][1]}{list(shapes[k][0])} vs {expected[k][1]}{list(expected[k][0])}"
        for k in expected
        if k in shapes
        and (shapes[k][0] != expected[k][0] or shapes[k][1] not in _STORABLE.get(expected[k][1], ()))
    ]
    _refuse_misfit(where, missing, unexpected, wrong, "shape/dtype mismatch")


def max_weights_bytes(expected: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """The largest safetensors file that can hold the tensors ``expected`` describes."""
    data = sum(math.prod(shape) * _SAFETENSORS_DTYPES.get(dtype, 8) for shape, dtype in expected.values())
    return 8 + HEADER_MAX_BYTES + data


def read_weights(
    folder: Path,
    config: dict[str, Any] | None = None,
    expected: dict[str, tuple[tuple[int, ...], str]] | None = None,
    *,
    name: str = WEIGHTS_NAME,
) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors`` (or ``folder/name``), never unpickled.

    With ``expected`` (``expected_tensors``), a file larger than those tensors need is refused unread, and
    the header's names, shapes and dtypes must be those; the file must match the ``weights_sha256`` of
    ``config`` (config.json, or the block that names the file); the header must describe tensors that lie
    inside the file, contiguously."""
    folder = Path(folder)
    weights = folder / name
    if not (weights.exists() or weights.is_symlink()):
        pickled = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5")]
        hint = f" (found {', '.join(pickled)}: pickled/Keras weights are never loaded)" if pickled else ""
        raise CheckpointError(f"{folder}: missing {name}{hint}")
    limit = max_weights_bytes(expected) if expected is not None else 2**62
    weights = member(folder, name, limit)
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        blob = f.read(size + 1)
    if len(blob) != size:
        raise CheckpointError(f"{weights}: changed while being read; try again")
    sha = (config or {}).get("weights_sha256")
    if sha and hashlib.sha256(blob).hexdigest() != sha:
        raise CheckpointError(f"{weights}: sha256 does not match config.json (files from different saves?)")
    if len(blob) < 8:
        raise CheckpointError(f"{weights}: unreadable safetensors file (only {len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(HEADER_MAX_BYTES, len(blob) - 8):
        raise CheckpointError(
            f"{weights}: safetensors header claims {n:,} bytes in a {len(blob):,}-byte file; refused"
        )
    header = _loads(blob[8 : 8 + n], weights, "safetensors header")
    _check_header(header, len(blob) - 8 - n, weights, expected)
    try:
        return load(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from None


def guard_tensors(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``expected_tensors`` of the guard autoencoder of the model of ``config`` (its input channels)."""
    in_chans = int(config.get("in_chans", 3))
    return expected_tensors(config, lambda _: ConvAutoencoder(CAEEncoder(in_chans), CAEDecoder(in_chans)))


def read_guard(folder: str | Path, config: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The tensors of the guard file config.json's ``ood`` block names, or None without a block.

    Checked as ``read_weights`` checks the model's (inside the folder, bounded, the block's sha256, names
    and shapes of the guard autoencoder); a missing file is a ``CheckpointError`` saying how to re-fit it."""
    block = config.get(GUARD_BLOCK)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise CheckpointError(f"config.json '{GUARD_BLOCK}' must be an object, got {type(block).__name__}")
    name = block.get("file", GUARD_NAME)
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise CheckpointError(f"config.json '{GUARD_BLOCK}' file must be a file name, got {name!r}")
    folder = Path(folder)
    if not ((folder / name).exists() or (folder / name).is_symlink()):
        raise CheckpointError(
            f"{folder}: config.json has an OOD guard but {name} is missing; "
            "re-fit it with `cxrcae calibrate-ood`"
        )
    return read_weights(folder, block, guard_tensors(config), name=name)


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
    _refuse_misfit(where, missing, unexpected, shapes, "shape mismatch")
    model.load_state_dict(state, strict=True)


def _refuse_misfit(where: Any, missing: list, unexpected: list, mismatched: list, label: str) -> None:
    """One error naming every way a set of tensors does not fit the model (nothing when it fits)."""
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"{label}: {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model; " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_folder(
    folder: str | Path, build: Builder, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a local checkpoint folder from config.json, weights loaded strictly."""
    folder = Path(folder)
    config = read_config(folder)
    state = read_weights(folder, config, expected_tensors(config, build))  # refused before anything is built
    model = build(config)
    load_state_strict(model, state, str(folder))
    return model.to(device).eval(), config


def encoder_state_of_folder(
    folder: str | Path, build: Builder
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder's tensors (keys without the ``encoder.`` prefix) from a local folder of any kind."""
    folder = Path(folder)
    config = read_config(folder)
    state = read_weights(folder, config, expected_tensors(config, build))
    if config["kind"] == "encoder":
        return state, config
    enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    if not enc:
        raise CheckpointError(f"{folder}: no encoder weights found in the checkpoint")
    return enc, config
