"""From DATA to train/val loaders: split selection, unreadable-file tolerance, augmentation, balancing.

Test images are never loaded here. A DataLoader is built once per run; each epoch reseeds its generator from
(seed, epoch), so shuffling, sampling and worker augmentation depend only on the seed and the epoch number,
which is what makes ``--resume`` reach the same weights as an uninterrupted run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, WeightedRandomSampler
from torchvision.transforms import v2

from cxrcae.data import Record, dataset_fingerprint, load_records, write_records
from cxrcae.data.dataset import SafeDataset, collate_with_errors
from cxrcae.data.splits import DEFAULT_RATIOS, make_splits
from cxrcae.errors import DataError, ImageLoadError
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import make_generator, worker_init_fn
from cxrcae.train.distributed import ShardSampler, World, current

SPLITS_NAME = "splits.csv"


@dataclass
class TrainData:
    """The records a run trains and validates on, and where the split came from."""

    train: list[Record]
    val: list[Record]
    source: str
    split_origin: str  # "file" (DATA had splits), "on-the-fly" (written to OUT/splits.csv), "resume"
    excluded_test: int = 0
    dropped_unlabeled: int = 0

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Provenance for config.json: fingerprint and counts per split, ``{split: {class: n}}`` (or
        ``{split: {"images": n}}`` without classes, e.g. for pretraining)."""
        counts: dict[str, Any] = {}
        for name, records in (("train", self.train), ("val", self.val)):
            by_class = Counter(r.label for r in records)
            if class_names:
                counts[name] = {c: by_class.get(c, 0) for c in class_names}
            else:
                counts[name] = {"images": len(records)}
        return {
            "source": self.source,
            "fingerprint": dataset_fingerprint([*self.train, *self.val]),
            "split_origin": self.split_origin,
            "counts": counts,
            "excluded_test_images": self.excluded_test,
            "dropped_unlabeled_images": self.dropped_unlabeled,
        }


def _from_split_column(records: list[Record], source: str, need_labels: bool) -> TrainData | None:
    if not any(r.split for r in records):
        return None
    missing = sum(1 for r in records if not r.split)
    if missing:
        raise DataError(f"{source}: {missing} record(s) have an empty split; give every row a split or none")
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if not train:
        raise DataError(f"{source}: the splits file has no 'train' rows")
    if not val and need_labels:
        raise DataError(f"{source}: the splits file has no 'val' rows (needed for early stopping)")
    test = sum(1 for r in records if r.split == "test")
    return TrainData(train, val, source, "file", excluded_test=test)


def pretrain_data(
    data: str | Path, out_dir: Path, val_fraction: float, seed: int, progress: ProgressFn = no_progress
) -> TrainData:
    """Unlabeled view of DATA: its ``train``/``val`` splits (test excluded), or a seeded patient-grouped
    hold-out of ``val_fraction`` written to OUT/splits.csv. Without pixel dedupe: a reconstruction
    objective gains little from duplicates, and hashing every image would cost a full decode pass."""

    records = load_records(data, labeled=False)
    data = os.path.abspath(data)  # recorded for provenance and --resume from any working directory
    split = _from_split_column(records, data, need_labels=False)
    if split is not None:
        if not split.val:  # a splits file with train/test only: hold out from train
            split = None
            records = [r for r in records if r.split == "train"]
        else:
            return split
    if len(records) < 2:
        raise DataError(f"{data}: need at least 2 images to hold out a validation set")
    # Stratify nothing (labels are ignored): every image is one stratum; patients stay together.
    plain = [Record(path=r.path, patient_id=r.patient_id, source=r.source, extra=r.extra) for r in records]
    split_recs = make_splits(
        plain, (1 - val_fraction, val_fraction, 0.0), seed, dedupe=False, progress=progress
    )
    train = [r for r in split_recs if r.split == "train"]
    val = [r for r in split_recs if r.split == "val"]
    if not val:
        val, train = train[-1:], train[:-1]
    if current().main:  # under torchrun every process makes the same split; rank 0 writes it
        write_records(split_recs, out_dir / SPLITS_NAME)
    return TrainData(train, val, data, "on-the-fly")


def finetune_data(
    data: str | Path,
    out_dir: Path,
    seed: int = 0,
    progress: ProgressFn = no_progress,
    need_label: bool = True,
) -> TrainData:
    """Labelled view of DATA: a splits CSV's train/val (test never touched), or a leak-free split made
    now as ``cxrcae split --seed SEED`` makes it (ratios 0.73/0.135/0.135, pixel dedupe), so the same DATA
    and seed give the same split either way; it is written to OUT/splits.csv.

    ``need_label=False`` (tasks whose targets live in other columns: masks, separated findings) keeps
    records without a ``label``; the task then checks its own columns."""

    records = load_records(data, labeled=need_label)
    data = os.path.abspath(data)
    unlabeled = sum(1 for r in records if r.label is None) if need_label else 0
    records = [r for r in records if r.label is not None or not need_label]
    if not records:
        raise DataError(f"{data}: no labelled images")
    split = _from_split_column(records, data, need_labels=True)
    if split is None:
        split_recs = make_splits(records, DEFAULT_RATIOS, seed, dedupe=True, progress=progress)
        if current().main:  # under torchrun every process makes the same split; rank 0 writes it
            write_records(split_recs, out_dir / SPLITS_NAME)
        train = [r for r in split_recs if r.split == "train"]
        val = [r for r in split_recs if r.split == "val"]
        test = sum(1 for r in split_recs if r.split == "test")
        split = TrainData(train, val, data, "on-the-fly", excluded_test=test)
        if not val:
            raise DataError(f"{data}: too few images for a validation split ({len(records)} labelled)")
    split.dropped_unlabeled = unlabeled
    return split


def resumed_data(previous: dict[str, Any], out_dir: Path, labeled: bool) -> TrainData:
    """Reload the exact records a run started with (OUT/splits.csv when it was split on the fly)."""
    source = previous["source"]
    if previous["split_origin"] == "on-the-fly":
        records = load_records(out_dir / SPLITS_NAME, labeled=False)
        if labeled:
            records = [r for r in records if r.label is not None]
        data = TrainData(
            [r for r in records if r.split == "train"],
            [r for r in records if r.split == "val"],
            source,
            "on-the-fly",
            excluded_test=previous.get("excluded_test_images", 0),
            dropped_unlabeled=previous.get("dropped_unlabeled_images", 0),
        )
    else:
        records = load_records(source, labeled=False)
        if labeled:
            records = [r for r in records if r.label is not None]
        data = _from_split_column(records, source, need_labels=labeled)
        if data is None:
            raise DataError(f"{source}: no longer has a split column; cannot resume")
        data.dropped_unlabeled = previous.get("dropped_unlabeled_images", 0)
    if dataset_fingerprint([*data.train, *data.val]) != previous["fingerprint"]:
        raise DataError(
            f"{source}: the data changed since the run started (fingerprint differs); cannot resume"
        )
    return data


def augmentation():
    """Light, label-preserving X-ray augmentation on the [0, 1] tensor (torchvision.transforms.v2):
    rotation +-5 deg, translation 5%, scale 0.95-1.05, brightness/contrast +-10%, clamped to [0, 1]."""

    return v2.Compose(
        [
            v2.RandomAffine(degrees=5, translate=(0.05, 0.05), scale=(0.95, 1.05)),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
            v2.Lambda(_clamp01),
        ]
    )


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)  # a named function (not a lambda) so spawned DataLoader workers can pickle it


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    sample_weights: torch.Tensor | None = None,
    pin_memory: bool = False,
    world: World = World(),
) -> DataLoader:
    """A DataLoader whose order and worker seeds depend only on ``seed`` (never the global RNG).

    Batches are ``collate_with_errors`` dicts (``"image"``, ``"label"``, ``"path"``, ``"skipped"``, ...): an
    unreadable file is listed under ``"skipped"`` as ``"path: reason"`` instead of stopping the epoch. In a
    torchrun ``world`` of N processes it yields this process's share of that order
    (``cxrcae.train.distributed.ShardSampler``)."""
    generator = make_generator(seed)
    sampler = None
    if sample_weights is not None:
        sampler = WeightedRandomSampler(
            sample_weights, len(sample_weights), replacement=True, generator=generator
        )
        shuffle = False
    if world.active:
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        sampler, shuffle = ShardSampler(sampler, world), False
    return DataLoader(
        SafeDataset(dataset, catch=(ImageLoadError,)),
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_with_errors,
        generator=generator,
        worker_init_fn=worker_init_fn,
        pin_memory=pin_memory,
        drop_last=False,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s loader: distinct per epoch, stable across resumes."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)
