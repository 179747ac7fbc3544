"""cxrcae.allocator: applied once per process, opt-out honoured, harmless where it cannot apply."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxrcae import allocator
from cxrcae.infer.prediction import predict
from cxrcae.train import FinetuneConfig, finetune

_SNIPPET = (
    "from cxrcae import allocator as a; import torch; "
    "first = a.keep_freed_memory(); x = torch.ones(20_000_000); del x; "
    "print(first, a.keep_freed_memory(), a.status())"
)


def _run(env_value: str | None) -> list[str]:
    env = dict(os.environ)
    env.pop("CXRCAE_ALLOCATOR", None)
    if env_value is not None:
        env["CXRCAE_ALLOCATOR"] = env_value
    cmd = [sys.executable, "-c", _SNIPPET]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only"
)
def test_kept_on_glibc_and_idempotent():
    assert _run(None) == ["True", "True", "kept"]


def test_opt_out_leaves_the_system_allocator():
    assert _run("system") == ["False", "False", "system"]


def test_library_calls_leave_the_allocator_alone(monkeypatch, tmp_path):
    """Only the CLI entry point (and the bench) change malloc for good; training and predicting from Python
    must not (CONTRIBUTING: library calls leave the process as they found it)."""
    calls: list[str] = []
    monkeypatch.setattr(allocator, "_apply", lambda: calls.append("mallopt") or True)
    monkeypatch.setitem(allocator._state, "applied", None)
    rng = np.random.default_rng(0)
    for label in ("A", "B"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    settings = {"image_size": 32, "epochs": 1, "batch_size": 4, "limit_batches": 1, "precision": "fp32"}
    cfg = FinetuneConfig(**settings, encoder=None, stages=("head",))
    run = finetune(tmp_path / "data", tmp_path / "run", cfg)
    rows = predict([tmp_path / "data" / "A" / "0.png"], model=run.best_dir, device="cpu")
    assert len(rows) == 1  # both paths ran to the end
    assert calls == [] and allocator.status() == "system"
    assert allocator.keep_freed_memory() and calls == ["mallopt"]  # the patch does see a real call
