"""What inference shares beyond decoding: a checkpoint loaded for one kind of use, output file names, and the
raw outputs of a list of files.

Decoding itself (``iter_batches``, where a bad file is a row) lives in ``cxrcae.data.stream``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrcae.data.stream import iter_batches
from cxrcae.errors import CheckpointError
from cxrcae.hub.resolve import LoadedModel, as_loaded, load_checkpoint
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast


def load_for_inference(model: Any, device: torch.device, kind: str = "classifier") -> tuple[Any, dict]:
    """A checkpoint folder / Hub id, or a model from ``load_model`` -> (model on device in eval mode, config).

    Refuses a checkpoint of the wrong kind with a message saying which command fits it.
    """

    if isinstance(model, nn.Module):
        config = getattr(model, "cxrcae_config", None)
        if not isinstance(config, dict):
            raise CheckpointError(
                "a model object needs its config: load it with cxrcae.load_model(...) or pass the folder"
            )
        net = model.to(device).eval()
    else:
        net, config = load_checkpoint(model, device)
    if config.get("kind") != kind:
        hint = {
            "classifier": "this needs a fine-tuned classifier (cxrcae finetune); for an autoencoder use "
            "`cxrcae reconstruct`",
            "autoencoder": "this needs an autoencoder checkpoint (cxrcae pretrain); for a classifier use "
            "`cxrcae predict`",
        }.get(kind, "")
        raise CheckpointError(f"{_name(model)} is a checkpoint of kind {config.get('kind')!r}; {hint}")
    return net, config


def answering_model(model: Any, device: Any = "cpu", *, weights: bool = True) -> LoadedModel:
    """``model`` (folder, Hub id, ``load_model`` object or ``LoadedModel``) resolved once, refused in one line
    unless its task answers something about an image (predict, evaluate: a task trained on labels)."""
    loaded = as_loaded(model, device, weights=weights)
    if not loaded.task.labelled:
        raise CheckpointError(
            f"{_name(model)} is a {loaded.task.name!r} model ({loaded.task.description}), which answers "
            "nothing about an image; this needs a model fine-tuned on labels (cxrcae finetune)"
        )
    return loaded


def _name(model: Any) -> str:
    if isinstance(model, LoadedModel):
        return model.ref
    return str(model) if isinstance(model, (str, Path)) else "the model"


class UniqueNames:
    """Output file per input: ``<stem><suffix>`` in ``folder``, numbered when two inputs share a stem."""

    def __init__(self, folder: Path, suffix: str):
        self.folder = Path(folder)
        self.suffix = suffix
        self.used: set[str] = set()

    def __call__(self, path: str | Path) -> Path:
        stem = Path(path).stem or "image"
        name, n = f"{stem}{self.suffix}", 1
        while name in self.used:
            n += 1
            name = f"{stem}-{n}{self.suffix}"
        self.used.add(name)
        return self.folder / name


def collect_outputs(
    net: Any,
    config: dict,
    paths: Sequence[str],
    device: Any,
    dtype: Any,
    *,
    batch_size: int,
    num_workers: int,
    progress: ProgressFn = no_progress,
    task: str = "inference",
) -> tuple[np.ndarray, list[int], list[tuple[int, str, str]]]:
    """Raw outputs (n_ok, ...) of the readable files (logits for a classifier), their indices in ``paths``,
    and the (index, path, reason) of the others."""

    chunks, ok, errors = [], [], []
    size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
    done = 0
    for batch in iter_batches(paths, size, mode, batch_size=batch_size, num_workers=num_workers):
        errors += batch.errors
        if batch.indices:
            with torch.inference_mode(), autocast(device, dtype):
                logits = net(batch.images.to(device, non_blocking=True))
            chunks.append(logits.float().cpu().numpy())
            ok += batch.indices
        done += len(batch)
        progress(task, done, len(paths))
    return (np.concatenate(chunks) if chunks else np.zeros((0,), dtype=np.float32)), ok, errors
