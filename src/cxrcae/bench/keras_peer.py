"""The Keras peer: the paper's own models in TensorFlow (``keras_reference.py``), run in a Python that has
TensorFlow, each figure the best of several runs.

TensorFlow's speed can be bimodal from run to run (TF 2.21 on an Intel AMX machine: 3.9 or 6.9 images/s,
same command), so two runs can both land on the slow mode and inflate every "vs keras" ratio 1.7x. The peer
therefore runs at least ``MIN_RUNS`` times per task; every run's figure is kept in its row (``keras_runs``,
in the order they ran) and the best is the row's ``images_per_s``, the figure the ratios use: noise can
only favour the peer.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrcae.errors import CxrcaeError
from cxrcae.progress import ProgressFn, no_progress

MIN_RUNS = 4


def keras_reference(
    python: str | Path, script: str | Path, task: str, *args: str, timeout: float = 3600
) -> dict[str, Any]:
    """Run ``keras_reference.py TASK ARGS`` in ``python`` (a TensorFlow environment); its JSON line."""
    cmd = [str(python), str(script), task, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CxrcaeError(f"Keras reference could not run ({' '.join(cmd)}): {exc}") from None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CxrcaeError(f"Keras reference failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1])


def best_of(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``images_per_s``: the best run's figure; ``keras_runs``: every run's, in the order they ran."""
    figures = [float(r["images_per_s"]) for r in results]
    if not figures:
        raise CxrcaeError("the Keras peer gave no run to compare with")
    return {"images_per_s": max(figures), "keras_runs": figures}


def keras_train_args(task: str, image_size: int, batch_size: int, steps: int) -> list[str]:
    """``keras_reference.py`` task and arguments of the peer of our training ``task``."""
    peer_task = "pretrain" if task == "pretrain" else "finetune"
    args = [peer_task, "--size", str(image_size), "--batch", str(batch_size), "--steps", str(steps)]
    if task == "finetune-frozen":
        args.append("--frozen")
    return args


@dataclass(frozen=True)
class KerasPeer:
    """``keras_reference.py`` (``script``) run by ``python``, ``runs`` times per task (at least ``MIN_RUNS``).

    ``runner(python, script, task, *args) -> JSON dict`` runs it once (``keras_reference``; a test passes a
    fake). Training peers train in fp32 with our image size, batch size and step count
    (``finetune-frozen`` is its ``finetune --frozen``).
    """

    python: str | Path
    script: str | Path
    runs: int = MIN_RUNS
    runner: Callable[..., dict[str, Any]] = keras_reference

    def __post_init__(self) -> None:
        if self.runs < MIN_RUNS:
            raise CxrcaeError(
                f"the Keras peer runs at least {MIN_RUNS} times per task (TensorFlow's speed changes from "
                f"run to run), not {self.runs}"
            )

    def train_row(
        self,
        task: str,
        image_size: int,
        batch_size: int,
        steps: int,
        progress: ProgressFn = no_progress,
    ) -> dict[str, Any]:
        """The peer row of training ``task``: every run's figure and the best."""
        args = keras_train_args(task, image_size, batch_size, steps)
        results = []
        for done in range(self.runs):
            progress(f"{task} keras", done, self.runs)
            results.append(self.runner(self.python, self.script, *args))
        progress(f"{task} keras", self.runs, self.runs)
        return {
            "impl": "keras",
            "task": task,
            "precision": "fp32",
            **best_of(results),
            "image_size": image_size,
            "batch_size": batch_size,
            "tf": results[0].get("tf"),
        }

    def predict_runs(
        self, folders: Sequence[str | Path], image_size: int, batch_size: int, count: int
    ) -> list[list[dict[str, Any]]]:
        """For each of ``folders``: ``count`` runs of the peer predicting its files."""
        runs = []
        for folder in folders:
            args = ("predict", str(folder), "--size", str(image_size), "--batch", str(batch_size))
            runs.append([self.runner(self.python, self.script, *args) for _ in range(count)])
        return runs

    def split_runs(self) -> tuple[int, int]:
        """How many predict runs go before ours and how many after (a shared machine's load moves within a
        minute; this way a quiet spell on either side can only favour the peer)."""
        before = (self.runs + 1) // 2
        return before, self.runs - before

    @staticmethod
    def predict_row(results: Sequence[dict[str, Any]], image_size: int) -> dict[str, Any]:
        """The peer row of predicting one folder from its runs."""
        return {
            "impl": "keras",
            "task": "predict",
            **best_of(results),
            "images": results[0].get("images"),
            "image_size": image_size,
        }
