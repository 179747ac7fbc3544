"""Running a study: every arm at every fraction on one split, then the paired comparisons.

``run_points`` is the machinery both presets share (``cxrcae transfer``, ``cxrcae ablate``); ``run_study``
is all of it for a study that needs nothing before its cells (transfer): claim the folder, make or reuse the
split, run the cells, write the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcae.eval.paired import Scores
from cxrcae.eval.probe import Features, ProbeData, probe_data
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.study.cells import finetune_cell, probe_cell, study_features
from cxrcae.study.outputs import headline_metrics, write_outputs
from cxrcae.study.spec import StudySpec, claimed, fraction_splits, percent, study_splits


@dataclass
class StudyResult:
    """What a study measured: per fraction, each arm's summary and test figures, and the comparisons."""

    out_dir: Path
    splits: Path
    task: str
    points: list[dict[str, Any]]
    """Per fraction: ``{"fraction", "train_images", "arms": {name: summary}, "comparisons": {...}}``."""
    arms: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metric: str = ""
    """The headline metric: what tables show first and the plot pairs."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "splits": str(self.splits),
            "task": self.task,
            "metric": self.metric,
            "arms": self.arms,
            "points": self.points,
            "notes": self.notes,
            "files": self.files,
        }


def run_points(
    out: Path, splits: Path, spec: StudySpec, progress: ProgressFn = no_progress
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every arm of ``spec`` at every fraction (finished cells read back), scored and paired; and notes."""
    spec.validate()
    lazy = _ProbeInputs(out, splits, spec, progress)
    points, notes = [], []
    for fraction in sorted(set(spec.fractions)):
        folder = out / f"f{percent(fraction)}"
        folder.mkdir(parents=True, exist_ok=True)
        fsplits, train_images = fraction_splits(splits, folder, fraction, spec)
        arms: dict[str, dict[str, Any]] = {}
        scores: dict[str, Scores] = {}
        for arm in spec.arms:
            if arm.mode == "probe":
                summary, scores[arm.name] = probe_cell(
                    folder / arm.folder, arm, fraction, lazy.data, lambda a=arm: lazy.features(a), spec
                )
            else:
                summary, scores[arm.name] = finetune_cell(fsplits, folder, arm, spec, progress)
            summary["test"] = scores[arm.name].headline(n_resamples=spec.n_bootstrap, seed=spec.seed)
            notes += [f"{arm.name}: {n}" for n in scores[arm.name].notes if f"{arm.name}: {n}" not in notes]
            arms[arm.name] = summary
        comparisons = {
            f"{a}-vs-{b}": scores[a].compare(scores[b], n_resamples=spec.n_bootstrap, seed=spec.seed)
            for a, b in spec.comparisons
        }
        points.append(
            {"fraction": fraction, "train_images": train_images, "arms": arms, "comparisons": comparisons}
        )
    return points, notes


class _ProbeInputs:
    """The probe's records and each encoder's features, made on first use only (a rerun whose probe cells
    are all finished reads neither)."""

    def __init__(self, out: Path, splits: Path, spec: StudySpec, progress: ProgressFn):
        self.out, self.splits, self.spec, self.progress = out, splits, spec, progress
        self._data: ProbeData | None = None
        self._features: dict[str, Features] = {}

    def data(self) -> ProbeData:
        if self._data is None:
            cfg = self.spec.probe
            self._data = probe_data(self.splits, cfg.labels, seed=cfg.seed, progress=self.progress)
        return self._data

    def features(self, arm) -> Features:
        if arm.name not in self._features:
            self._features[arm.name] = study_features(self.out, arm, self.data(), self.spec, self.progress)
        return self._features[arm.name]


def run_study(
    data: str | Path,
    out_dir: str | Path,
    spec: StudySpec,
    *,
    names: tuple[str, str] = ("a", "b"),
    progress: ProgressFn = no_progress,
) -> StudyResult:
    """Run (or continue) ``spec`` on ``data`` into ``out_dir`` and write its files (the plot shows the
    headline metrics of the task's kind, ``outputs.headline_metrics``)."""
    spec.validate()
    with claimed(out_dir, spec) as out:  # one writer per study folder
        splits = study_splits(data, out, spec, progress)
        points, notes = run_points(out, splits, spec, progress)
        result = StudyResult(out, splits, spec.task, points, arms=describe_arms(spec), notes=notes)
        panels = headline_metrics(points)
        result.metric = panels[0] if panels else ""
        body = {"settings": {**spec.settings, "fractions": sorted(spec.fractions)}, **result.to_dict()}
        result.files = write_outputs(
            out, spec.kind, body, points, panels=panels, difference=result.metric, names=names
        )
    return result


def describe_arms(spec: StudySpec) -> list[dict[str, Any]]:
    """The arms as the study's JSON lists them (name, mode, encoder, label, recipes)."""
    return [
        {
            "name": a.name,
            "mode": a.mode,
            "encoder": a.encoder or "random",
            "label": a.label or a.encoder or "random",
            "recipes": [r.name for r in a.recipes],
        }
        for a in spec.arms
    ]
