"""Decoding workers chosen from the run's own first batch (cxrcae.infer.workers)."""

from __future__ import annotations

import importlib
import os

import pytest
from PIL import Image

from cxrcae import runtime
from cxrcae.cli.common import DEFAULT_WORKERS_TEXT
from cxrcae.errors import CxrcaeError
from cxrcae.infer.workers import WorkerPlan, choose_workers
from cxrcae.runtime import MAX_WORKERS, default_workers


@pytest.mark.parametrize(
    ("decode_s", "compute_s", "cores", "expected"),
    [
        (0.8, 1.1, 2, 0),  # 224 px on 2 cores: the model's second thread is worth more than overlap
        (0.8, 0.2, 2, 1),  # small model, slow decode: one worker decodes while one thread predicts
        (0.8, 1.1, 4, 1),
        (0.8, 0.4, 16, 2),  # more workers would starve the model of cores
        (0.8, 0.1, 16, 4),  # capped
        (0.8, 1.1, 1, 0),  # one core: nothing to overlap with
    ],
)
def test_choice_follows_the_measured_balance(decode_s, compute_s, cores, expected):
    assert choose_workers(decode_s, compute_s, 32, cores, remaining=1000, batch_size=32) == expected


def test_short_runs_never_start_workers():
    assert choose_workers(0.8, 0.2, 32, 2, remaining=40, batch_size=32) == 0


def test_auto_plan_measures_then_continues_with_offset_indices(monkeypatch, tmp_path):
    from cxrcae.infer import workers as module

    paths = [tmp_path / f"{i}.png" for i in range(10)]
    for p in paths[:9]:
        from PIL import Image

        Image.new("L", (40, 40), color=len(p.name) * 9).save(p)
    paths[9].write_bytes(b"not an image")
    chosen = []
    real = module.choose_workers
    monkeypatch.setattr(module, "choose_workers", lambda *a: chosen.append(a) or real(*a))

    plan = WorkerPlan(None)
    assert plan.workers == 0
    seen, errors = [], []
    for batch in plan.batches(paths, 32, "stretch", 4, facts=False):
        with plan.computing():
            seen += batch.indices
            errors += [i for i, _, _ in batch.errors]
    assert seen == list(range(9)) and errors == [9]  # every input once, in order, offsets applied
    assert len(chosen) == 1 and chosen[0][2:] == (4, chosen[0][3], 6, 4)


def test_fixed_plan_never_measures(monkeypatch, tmp_path):
    """A given count decodes every batch with it: no first batch decoded apart, no choice made."""
    from cxrcae.infer import workers as module

    paths = [tmp_path / f"{i}.png" for i in range(10)]  # enough batches that an auto plan would choose
    for p in paths:
        Image.new("L", (40, 40), color=7).save(p)
    runs = []
    real = module.iter_batches

    def recording(part, *args, **kwargs):
        runs.append((len(part), args[3]))  # (paths, workers)
        return real(part, *args, **kwargs)

    monkeypatch.setattr(module, "iter_batches", recording)
    monkeypatch.setattr(module, "choose_workers", lambda *a: pytest.fail("a fixed count is not re-chosen"))
    plan = WorkerPlan(0)  # an auto plan would decode the first 4 apart: [(4, 0), (6, chosen)]
    seen = [i for batch in plan.batches(paths, 32, "stretch", 4, facts=False) for i in batch.indices]
    assert seen == list(range(10)) and plan.workers == 0 and runs == [(10, 0)]


@pytest.mark.parametrize(("cpus", "expected"), [(None, 0), (1, 0), (2, 0), (3, 1), (4, 2), (64, MAX_WORKERS)])
def test_the_default_worker_count_leaves_the_model_two_cores(monkeypatch, cpus, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert default_workers() == default_workers(None) == expected
    assert default_workers(0) == 0 and default_workers(3) == 3  # a given count always wins
    assert DEFAULT_WORKERS_TEXT == f"CPUs-2, max {MAX_WORKERS}"  # what --help says


def _refuse_with_workers(*args, **kwargs):
    """Stands in for a command's core call: fails with the worker count the command passed."""
    configs = [a.num_workers for a in args if hasattr(a, "num_workers")]
    raise CxrcaeError(f"workers={kwargs['num_workers'] if 'num_workers' in kwargs else configs[0]}")


@pytest.mark.parametrize(
    ("args", "module", "name"),
    [
        (("evaluate", "m", "d.csv"), "cxrcae.eval.evaluation", "evaluate"),
        (("calibrate", "m", "d.csv"), "cxrcae.eval.calibration", "calibrate"),
        (("calibrate-ood", "m", "d"), "cxrcae.train.guard", "calibrate_ood"),
        (("reconstruct", "m", "a.png", "--out", "o"), "cxrcae.infer.reconstruct", "reconstruct"),
        (("pretrain", "d", "--out", "o"), "cxrcae.train", "pretrain"),
        (("finetune", "d", "--out", "o", "--encoder", "none"), "cxrcae.train", "finetune"),
        (("reproduce", "d", "--out", "o"), "cxrcae.pipeline", "run_pipeline"),
        (("ablate", "d", "--out", "o"), "cxrcae.ablation", "run_ablation"),
    ],
)
def test_commands_without_num_workers_take_the_one_default(cli, monkeypatch, tmp_path, args, module, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "default_workers", lambda n=None: 7 if n is None else n)
    monkeypatch.setattr(importlib.import_module(module), name, _refuse_with_workers)
    assert "workers=7" in cli(*args).output
    assert "workers=1" in cli(*args, "--num-workers", "1").output
