"""How many decoding worker processes a predict run should use, measured on its own first batch.

Workers pay off only when decoding is a large share of the work and there are cores to spare: on 2 cores with
full-size X-rays and a 224 px model, one worker (and one model thread) predicted 9.6 img/s and no worker 14.9
(the model's 2-thread forward is worth more than the overlap). With a 96 px model the balance tips the other
way. So by default (``num_workers=None``) the first batch is decoded here and timed, the model's time on it
too, and the rest of the run gets the worker count with the best modelled throughput:

- no workers: decode (one core) then the model (all cores), one after the other;
- ``w`` workers: they decode on ``w`` cores while the model runs on the others, the slower stage setting
  the pace, discounted by ``OVERLAP_EFFICIENCY`` for process start-up and for moving batches across.

Runs shorter than ``MIN_BATCHES_FOR_WORKERS`` more batches never start workers (start-up would not pay).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from cxrcae.data.stream import Batch, iter_batches
from cxrcae.runtime import MAX_WORKERS

OVERLAP_EFFICIENCY = 0.85
MIN_BATCHES_FOR_WORKERS = 2


def choose_workers(
    decode_s: float, compute_s: float, images: int, cores: int, remaining: int, batch_size: int
) -> int:
    """Workers for the rest of a run whose first ``images`` took ``decode_s`` (one core) to decode and
    ``compute_s`` (all ``cores``) to predict."""
    if images < 1 or cores < 2 or remaining < MIN_BATCHES_FOR_WORKERS * batch_size:
        return 0
    decode = max(decode_s, 1e-9) / images  # seconds of one core per image
    compute = max(compute_s, 1e-9) * cores / images  # core-seconds of the model per image
    best, best_rate = 0, 1.0 / (decode + compute / cores)
    for workers in range(1, min(MAX_WORKERS, cores - 1) + 1):
        rate = OVERLAP_EFFICIENCY * min(workers / decode, (cores - workers) / compute)
        if rate > best_rate:
            best, best_rate = workers, rate
    return best


class WorkerPlan:
    """``batches`` over a run's paths with a fixed worker count, or chosen after the first batch (``None``).

    The caller wraps its model work on each batch in ``computing()`` (timed for the choice) and reads
    ``workers`` for the count in effect (0 while the first batch is measured).
    """

    def __init__(self, num_workers: int | None):
        self.auto = num_workers is None
        self.workers = 0 if num_workers is None else int(num_workers)
        self._compute_s = 0.0

    @contextmanager
    def computing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._compute_s += time.perf_counter() - start

    def batches(
        self, paths: Sequence[str | Path], image_size: int, resize_mode: str, batch_size: int, facts: bool
    ) -> Iterator[Batch]:
        def run(part: Sequence[str | Path], workers: int) -> Iterator[Batch]:
            return iter_batches(part, image_size, resize_mode, batch_size, workers, facts=facts)

        if not self.auto:
            yield from run(paths, self.workers)
            return
        head, rest = paths[:batch_size], paths[batch_size:]
        start = time.perf_counter()
        first = list(run(head, 0))  # one batch (or none, for an empty run)
        decode_s = time.perf_counter() - start
        yield from first  # the caller predicts it inside computing()
        if not rest:
            return
        cores = max(1, torch.get_num_threads())
        self.workers = choose_workers(decode_s, self._compute_s, len(head), cores, len(rest), batch_size)
        offset = len(head)
        for batch in run(rest, self.workers):
            yield replace(
                batch,
                indices=[i + offset for i in batch.indices],
                errors=[(i + offset, p, r) for i, p, r in batch.errors],
            )


@contextmanager
def threads_beside(dev: torch.device, workers: int) -> Iterator[None]:
    """For one forward pass on the CPU, torch's threads cut to the cores the decoding workers leave free
    (restored after): on 2 cores with 1 worker, 1 thread predicted 8.2 img/s and 2 threads 5.9 (224 px)."""
    before = torch.get_num_threads()
    wanted = max(1, before - int(workers)) if dev.type == "cpu" else before
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)
