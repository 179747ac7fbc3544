"""Does CAE pretraining help? The paper's classifier against its random-initialisation twins, paired.

A preset of the study machinery ``cxrcae transfer`` runs on (``cxrcae.study``): one split, seed and epoch
budget, one arm per recipe, every arm scored on the same test images. For each labelled fraction (a
label-efficiency curve; the autoencoder always pretrains on every allowed train/val image, labels or not)
three classifiers are trained:

- ``cae``: the paper's recipe over the CAE-pretrained encoder (head stage, then all layers at 1e-5);
- ``random``: the same recipe over a random encoder - the ablation the paper implies, but a handicapped
  one: its head stage trains over random features and its encoder then moves at 1e-5;
- ``random-plain``: a random encoder with its own best plain recipe - all layers from the start for the
  same epoch budget, the learning rate chosen among ``plain_lrs`` on **validation** loss (the test split
  only ever sees the chosen one).

``cae`` is compared with each baseline by a paired bootstrap over test patients (``eval.paired``).

Run folder: ``OUT/splits.csv``, ``OUT/cae/`` (pretraining), ``OUT/f<percent>/`` per fraction (its
``splits.csv`` and one run folder per arm, each with its ``test-scores.npz``), and ``OUT/ablation.json``,
``ablation.csv``, ``comparisons.csv``, ``ablation.png``. Running the same command again continues an
interrupted study: finished arms are read back, an interrupted training run is resumed; other
``--fractions`` add (or leave out) points of the curve without retraining the others.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxrcae._atomic import atomic_write_text
from cxrcae.errors import CxrcaeError
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.study import (
    Arm,
    Recipe,
    StudySpec,
    claimed,
    continue_or_restart,
    run_points,
    study_splits,
    write_outputs,
)
from cxrcae.study.outputs import arm_rows, comparison_rows
from cxrcae.train import FinetuneConfig, PretrainConfig, pretrain

KIND = "ablation"
ARMS = ("cae", "random", "random-plain")
BASELINES = ("random", "random-plain")
NAMES = ("cae", "baseline")
"""The two figures of a comparisons.csv row: ``cae`` minus ``baseline``."""
PANELS = ("accuracy", "macro_auc")


@dataclass
class AblationConfig:
    """One study's settings; all arms share the split, seed, image size, batch and epoch budget."""

    fractions: tuple[float, ...] = (1.0,)
    """Labelled share of the training images per point of the curve (val and test stay whole)."""
    image_size: int = 224
    pretrain_epochs: int = 100
    finetune_epochs: int = 20
    """Maximum epochs per stage; the plain recipe gets the same total (stages x this) in one stage."""
    plain_lrs: tuple[float, ...] = (1e-3, 1e-4)
    head: str = "lstm"
    encoder: str | None = None
    """An existing CAE (pretrain run folder, checkpoint or Hub id) instead of pretraining one here."""
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    limit_batches: int | None = None
    n_bootstrap: int = 1000

    def validate(self) -> None:
        if not self.fractions:
            raise CxrcaeError("--fractions needs at least one labelled fraction (e.g. 0.05,0.25,1)")
        if not self.plain_lrs or any(not lr > 0 for lr in self.plain_lrs):
            raise CxrcaeError("--plain-lrs needs positive learning rates (e.g. 1e-3,1e-4)")

    def settings(self) -> dict[str, Any]:
        """What must match for a rerun to continue the same study. Devices and workers may change, and so
        may the fractions: each point of the curve is trained on its own, so a rerun can add points."""
        data = asdict(self)
        for key in ("device", "num_workers", "fractions"):
            data.pop(key)
        data["plain_lrs"] = [float(lr) for lr in self.plain_lrs]
        return data


@dataclass
class AblationResult:
    out_dir: Path
    splits: Path
    encoder: str
    points: list[dict[str, Any]]
    """Per fraction: ``{"fraction", "train_images", "arms": {arm: summary}, "comparisons": {...}}``."""
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "splits": str(self.splits),
            "encoder": self.encoder,
            "points": self.points,
            "files": self.files,
        }


def run_ablation(
    data: str | Path,
    out_dir: str | Path,
    cfg: AblationConfig | None = None,
    progress: ProgressFn = no_progress,
) -> AblationResult:
    """Run (or continue) the study of ``cfg`` on ``data`` into ``out_dir``; see the module docstring."""
    cfg = cfg or AblationConfig()
    cfg.validate()
    spec = _spec(cfg, encoder="")
    spec.validate()
    with claimed(out_dir, spec) as out:  # one writer per study folder
        splits = study_splits(data, out, spec, progress)
        encoder = cfg.encoder or _pretrained(splits, out / "cae", cfg, spec, progress)
        spec = _spec(cfg, encoder)
        points, _ = run_points(out, splits, spec, progress)
        result = AblationResult(out_dir=out, splits=splits, encoder=str(encoder), points=points)
        study = {"settings": {**cfg.settings(), "fractions": sorted(cfg.fractions)}, **result.to_dict()}
        study.pop("points"), study.pop("files")
        result.files = write_outputs(
            out, KIND, study, points, panels=PANELS, difference="accuracy", names=NAMES
        )
    return result


def _spec(cfg: AblationConfig, encoder: str) -> StudySpec:
    """The three arms over ``encoder`` (the CAE), each compared as ``cae`` minus the baseline."""
    common = dict(head=cfg.head, **_common(cfg))
    paper = FinetuneConfig(epochs=cfg.finetune_epochs, **common)
    budget = cfg.finetune_epochs * len(paper.stages)
    plain = tuple(
        Recipe(
            f"random-plain-lr{lr:g}",
            FinetuneConfig(epochs=budget, encoder=None, stages=("all",), lr=lr, lr_unfrozen=lr, **common),
        )
        for lr in cfg.plain_lrs
    )
    arms = (
        Arm(
            "cae",
            "finetune",
            encoder,
            (Recipe("cae", FinetuneConfig(epochs=cfg.finetune_epochs, encoder=encoder, **common)),),
        ),
        Arm(
            "random",
            "finetune",
            None,
            (Recipe("random", FinetuneConfig(epochs=cfg.finetune_epochs, encoder=None, **common)),),
        ),
        Arm("random-plain", "finetune", None, plain),
    )
    return StudySpec(
        kind=KIND,
        arms=arms,
        comparisons=tuple(("cae", b) for b in BASELINES),
        fractions=tuple(cfg.fractions),
        settings=cfg.settings(),
        seed=cfg.seed,
        device=cfg.device,
        num_workers=cfg.num_workers,
        n_bootstrap=cfg.n_bootstrap,
    )


def _pretrained(
    splits: Path, folder: Path, cfg: AblationConfig, spec: StudySpec, progress: ProgressFn
) -> str:
    """The CAE's best checkpoint, pretraining (or resuming) it on the train/val images when needed."""
    best = folder / "best"
    done = folder.parent / "cae.json"
    if not done.exists():
        resumed = continue_or_restart(folder, "pretrain", spec, progress) if folder.exists() else None
        if resumed is None:
            pretrain(splits, folder, PretrainConfig(epochs=cfg.pretrain_epochs, **_common(cfg)), progress)
        atomic_write_text(done, json.dumps({"best_dir": str(best)}) + "\n")
    return str(best)


def _common(cfg: AblationConfig) -> dict[str, Any]:
    return dict(
        image_size=cfg.image_size,
        seed=cfg.seed,
        device=cfg.device,
        precision=cfg.precision,
        num_workers=cfg.num_workers,
        limit_batches=cfg.limit_batches,
    )


__all__ = ["ARMS", "AblationConfig", "AblationResult", "arm_rows", "comparison_rows", "run_ablation"]
