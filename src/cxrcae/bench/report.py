"""The rows of one benchmark run and the ratios taken between them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BenchReport:
    """The rows of one ``run_bench``, in the order they were measured.

    Each row has ``impl`` (``cxrcae`` or ``keras``) and ``task``. Our rows are those of ``bench_train_step``,
    ``bench_pipeline`` and ``bench_predict``; a Keras row carries the peer's best ``images_per_s`` and every
    run's figure (``keras_runs``). Our rows with a Keras row of the same task get ``vs_keras``: our images/s
    over the peer's best (above 1: we are faster).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def keras_figures(self) -> dict[str, float]:
        """The Keras images/s of each task that has a peer row (the last one, when a task has several)."""
        return keras_figures(self.rows)

    @property
    def comparisons(self) -> list[dict[str, Any]]:
        """Our rows that have a Keras peer: the setting, our figure, the Keras figures and the ratio."""
        peers = {r["task"]: r for r in self.rows if r["impl"] == "keras"}
        return [
            {
                "task": r["task"],
                "precision": r.get("precision"),
                "channels_last": r.get("channels_last"),
                "backend": r.get("backend"),
                "images_per_s": r["images_per_s"],
                "keras_images_per_s": peers[r["task"]]["images_per_s"],
                "keras_runs": peers[r["task"]].get("keras_runs"),
                "vs_keras": r["vs_keras"],
            }
            for r in self.rows
            if r["impl"] == "cxrcae" and "vs_keras" in r
        ]


def keras_figures(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Task -> the Keras row's images/s (its best run)."""
    return {r["task"]: r["images_per_s"] for r in rows if r["impl"] == "keras"}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each cxrcae row's speed relative to the Keras row of the same task, when there is one."""
    peers = keras_figures(rows)
    for r in rows:
        if r["impl"] == "cxrcae" and r.get("images_per_s") and peers.get(r["task"]):
            r["vs_keras"] = r["images_per_s"] / peers[r["task"]]
