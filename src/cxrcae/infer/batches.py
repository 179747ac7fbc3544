"""Batched, streaming model input over arbitrary file paths, where a bad file is a row, not a crash.

``iter_batches`` is what predict, reconstruct and embed share: a ``DataLoader`` (workers decode in parallel,
memory stays flat however many paths there are) over ``cxrcae.io.load_for_model``. A file that cannot be
decoded does not stop the run: it comes back in the batch's ``errors`` with its input index and a one-line
reason (``cxrcae.data.dataset.failure_reason``, the same words training uses when it skips a file: both go
through ``SafeDataset`` and ``collate_with_errors``), so callers can emit one output row per input, in
input order.

Contract::

    for batch in iter_batches(paths, image_size=224, resize_mode="stretch", batch_size=32, num_workers=2):
        batch.images   # float32 tensor (n_ok, 3, S, S) in [0, 1]; n_ok may be 0 when every file failed
        batch.indices  # list[int]: position in ``paths`` of each image row
        batch.paths    # list[str]: the matching paths
        batch.errors   # list[(index, path, reason)] for the files of this batch that failed
        batch.facts    # with facts=True: cxrcae.io.facts.ImageFacts per image row (colour, DICOM header)

Batches arrive in input order and every index in ``range(len(paths))`` appears exactly once, either in
``indices`` or in ``errors``. Within a batch, merging ``indices`` and ``errors`` by index restores order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrcae.data.dataset import SafeDataset, Unreadable, collate_with_errors
from cxrcae.errors import CheckpointError, CxrcaeError
from cxrcae.hub.resolve import load_checkpoint
from cxrcae.io import load_for_model
from cxrcae.io.facts import ImageFacts, load_with_facts
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast


@dataclass
class Batch:
    """Decoded images of one batch plus the files of that batch that failed."""

    images: torch.Tensor
    indices: list[int]
    paths: list[str]
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    facts: list[ImageFacts] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices) + len(self.errors)


class PathDataset(Dataset):
    """Items ``{"image": (3,S,S) float32, "path": str}`` for the files of ``paths``, in order; with
    ``facts``, also ``"facts"``: what the out-of-distribution screen needs, from the same single decode.

    Decoding errors are not caught here: ``iter_batches`` wraps it in ``SafeDataset`` (the wrapper training
    uses too), which turns them into error rows in the worker.
    """

    def __init__(
        self, paths: Sequence[str | Path], image_size: int, resize_mode: str = "stretch", facts: bool = False
    ):
        self.paths = [str(p) for p in paths]
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.facts = facts

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        """The path of item ``index`` exactly as given (``SafeDataset`` names failed items with it)."""
        return self.paths[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        if self.facts:
            image, facts = load_with_facts(path, self.image_size, self.resize_mode)
            return {"image": torch.from_numpy(image), "path": path, "facts": facts}
        return {
            "image": torch.from_numpy(load_for_model(path, self.image_size, mode=self.resize_mode)),
            "path": path,
        }


def iter_batches(
    paths: Sequence[str | Path],
    image_size: int,
    resize_mode: str = "stretch",
    batch_size: int = 32,
    num_workers: int = 0,
    pin_memory: bool = False,
    facts: bool = False,
) -> Iterator[Batch]:
    """Yield ``Batch`` objects over ``paths`` in order (see the module docstring for the contract)."""
    if batch_size < 1:
        raise CxrcaeError(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise CxrcaeError(f"number of workers must be >= 0, got {num_workers}")
    dataset = PathDataset(paths, image_size, resize_mode, facts)
    if len(dataset) == 0:
        return
    loader = DataLoader(
        SafeDataset(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(num_workers, max(1, -(-len(dataset) // batch_size))) if num_workers else 0,
        collate_fn=partial(_collate, image_size=int(image_size)),
        pin_memory=pin_memory,
    )
    for batch in loader:
        yield Batch(batch["image"], batch["index"], batch["path"], batch["errors"], batch["facts"])


def _collate(items: list[dict[str, Any] | Unreadable], image_size: int) -> dict:
    """``collate_with_errors`` plus the ``facts`` of the readable items (empty when not asked for)."""
    batch = collate_with_errors(items, image_size)
    batch["facts"] = [it["facts"] for it in items if not isinstance(it, Unreadable) and "facts" in it]
    return batch


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


def _name(model: Any) -> str:
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


def collect_logits(
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
    """Logits (n_ok, K) of the readable files, their indices in ``paths``, (index, path, reason) errors."""

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
    k = len(config["class_names"])
    return (np.concatenate(chunks) if chunks else np.zeros((0, k))), ok, errors
