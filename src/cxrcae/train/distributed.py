"""Several processes, one run: ``torchrun --nproc_per_node N -m cxrcae pretrain ...`` (PyTorch DDP).

torchrun starts N copies of the command and tells each its place through the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``); ``current`` reads it. A plain run is a world of one and takes none of the branches
below: no process group, no wrapper, the same code and numbers as before. In a world of N:

- each process trains on ``cuda:LOCAL_RANK`` (NCCL) or on the CPU (gloo): ``local_device``;
  ``process_group`` opens the group around ``fit`` and closes it after a final barrier;
- the model is wrapped in ``DistributedDataParallel`` for the training step only (``wrap``): gradients are
  averaged over the processes, so every process keeps the same weights;
- every process draws an epoch's whole order from the same seeded generator and takes its share
  (``ShardSampler``: positions r, r+N, r+2N, ...), so with ``--batch-size B`` global batch k holds exactly
  the images of batch k of a one-process run at batch N x B. Weighted sampling is dealt out the same way;
- every process validates the whole validation set and rank 0's loss is broadcast (``from_rank0``), so
  early stopping takes the same decision everywhere;
- only rank 0 (``World.main``) writes the run folder and reports progress. Pretraining's mean-image
  baseline is measured on rank 0's share of the training images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from cxrcae.errors import CxrcaeError


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run (a world of one without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and reports progress."""
        return self.rank == 0


def current() -> World:
    """The world torchrun (or SLURM + torchrun) described in the environment."""
    size = int(os.environ.get("WORLD_SIZE") or 1)
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK") or 0), int(os.environ.get("LOCAL_RANK") or 0), size)


def local_device(device: torch.device, world: World | None = None) -> torch.device:
    """``device`` for this process: under torchrun a CUDA run uses ``cuda:LOCAL_RANK`` (made the current
    device), a CPU run the CPU; other devices cannot join a process group."""
    world = world or current()
    if not world.active or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise CxrcaeError(f"training in several processes needs CUDA GPUs or the CPU, not {device.type!r}")
    if world.local_rank >= torch.cuda.device_count():
        raise CxrcaeError(
            f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Inside the block this process is a member of the torchrun world (NCCL on CUDA, else gloo); after it
    (when the block ran through) every process has reached the end. A world of one opens nothing, and a
    group someone else opened is used and left open."""
    world = current()
    if not world.active or dist.is_initialized():
        yield world
        return
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield world
        dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``model`` for the training step: wrapped in DDP (gradients averaged over processes) in a world of N.

    Build it again whenever ``requires_grad`` changes (DDP registers the trainable parameters once)."""
    if not world.active:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def from_rank0(value: float, world: World, device: torch.device) -> float:
    """Rank 0's ``value`` on every process (a decision every process must take alike)."""
    if not world.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


class ShardSampler(Sampler[int]):
    """Process ``rank``'s share of ``sampler``'s order, as ``DistributedSampler`` deals it.

    Every process draws the whole order (the same one: the sampler's generator is seeded alike everywhere),
    pads it to a multiple of ``size`` by repeating its start, and keeps positions ``rank``, ``rank + size``,
    ... So every process gets as many images and batches as the others (no process waits for a step the
    others skip), and ``size`` processes at batch B see, batch by batch, the images of one at ``size`` x B.
    """

    def __init__(self, sampler: Sampler[Any], world: World):
        self.sampler, self.rank, self.size = sampler, world.rank, world.size

    def __len__(self) -> int:
        sampler: Sized = self.sampler  # type: ignore[assignment]
        return math.ceil(len(sampler) / self.size)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        missing = len(self) * self.size - len(order)
        if missing and order:
            order += (order * math.ceil(missing / len(order)))[:missing]
        return iter(order[self.rank :: self.size])
