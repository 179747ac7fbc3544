"""The paper end to end on one dataset: split, audit, CAE pretraining, gradual unfreezing, test metrics.

Each step is the same core function its own command runs; this module only chains them inside one run folder
so that a researcher reproduces the method on their data with one call, and nothing of the test split is seen
before the final evaluation (the autoencoder is pretrained on the train/val images only). The audit reuses
the pixel hashes the split computed, so each image is decoded for its pixel hash once.

Run folder: ``OUT/splits.csv`` (given or made), ``OUT/audit.json``, ``OUT/cae/`` (a pretrain run),
``OUT/clf/`` (a finetune run), ``OUT/clf/best/eval-test/`` (metrics, predictions, plots, report.html) and
``OUT/summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcae._atomic import atomic_write_text
from cxrcae.data import load_records, split_records, write_records
from cxrcae.data.audit import audit_records
from cxrcae.errors import DataError
from cxrcae.eval.evaluation import evaluate
from cxrcae.io import FileHashes
from cxrcae.locking import hold
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.train import FinetuneConfig, PretrainConfig, finetune, pretrain

SUMMARY_NAME = "summary.json"


@dataclass
class PipelineConfig:
    """The knobs a quick or full reproduction needs; each step keeps the paper's defaults otherwise."""

    image_size: int = 224
    pretrain_epochs: int = 100
    finetune_epochs: int = 20
    head: str = "lstm"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    limit_batches: int | None = None
    n_bootstrap: int = 1000
    audit: bool = True


@dataclass
class PipelineResult:
    out_dir: Path
    splits: Path
    audit: dict[str, Any] | None
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    test: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "splits": str(self.splits),
            "audit": self.audit,
            "pretrain": self.pretrain,
            "finetune": self.finetune,
            "test": self.test,
            "files": self.files,
        }


def run_pipeline(
    data: str | Path,
    out_dir: str | Path,
    cfg: PipelineConfig | None = None,
    progress: ProgressFn = no_progress,
) -> PipelineResult:
    """Split ``data``, audit it, pretrain the CAE, fine-tune from it and evaluate on the test split, all in
    ``out_dir`` (which must not hold a run yet); ``OUT/summary.json`` gets the headline figures.
    """
    cfg = cfg or PipelineConfig()
    out = Path(out_dir).expanduser()
    with hold(out, folder=True):  # OUT is this run's alone, as a training run folder (cxrcae.locking)
        return _run_pipeline(Path(data), out, cfg, progress)


def _run_pipeline(data: Path, out: Path, cfg: PipelineConfig, progress: ProgressFn) -> PipelineResult:
    if (out / SUMMARY_NAME).exists() or (out / "cae").exists():
        raise DataError(f"{out}: already holds a pipeline run; choose another --out")

    splits, pixel_hashes = prepare_splits(data, out, cfg.seed, progress)
    audit = _audit(splits, pixel_hashes, progress) if cfg.audit else None
    if audit is not None:
        atomic_write_text(out / "audit.json", json.dumps(audit, indent=2, default=str) + "\n")

    common = dict(
        image_size=cfg.image_size,
        seed=cfg.seed,
        device=cfg.device,
        precision=cfg.precision,
        num_workers=cfg.num_workers,
        limit_batches=cfg.limit_batches,
    )
    cae = pretrain(splits, out / "cae", PretrainConfig(epochs=cfg.pretrain_epochs, **common), progress)
    clf = finetune(
        splits,
        out / "clf",
        FinetuneConfig(epochs=cfg.finetune_epochs, encoder=cae.best_dir, head=cfg.head, **common),
        progress,
    )
    result = evaluate(
        clf.best_dir,
        splits,
        split="test",
        device=cfg.device,  # fp32, evaluate's default: test metrics must not depend on the training hardware
        n_bootstrap=cfg.n_bootstrap,
        seed=cfg.seed,
        progress=progress,
    )
    summary = PipelineResult(
        out_dir=out,
        splits=splits,
        audit=audit,
        pretrain={
            "best_dir": cae.best_dir,
            "epochs_run": cae.epochs_run,
            "best_val_mse": cae.best_val_loss,
            "mean_image_val_mse": (cae.baseline or {}).get("val_mse_mean_image"),
            "seconds": cae.seconds,
        },
        finetune={
            "best_dir": clf.best_dir,
            "epochs_run": clf.epochs_run,
            "best_val_loss": clf.best_val_loss,
            "best_metrics": clf.best_metrics,
            "seconds": clf.seconds,
        },
        test=headline(result.metrics),
        files={k: str(v) for k, v in result.files.items()},
    )
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2, default=str) + "\n")
    return summary


def prepare_splits(
    data: Path, out: Path, seed: int, progress: ProgressFn
) -> tuple[Path, FileHashes[str] | None]:
    """DATA's own split when it has one, else a leak-free split written to OUT/splits.csv, with the pixel
    hashes the split computed (None for DATA's own split: nothing was hashed)."""

    records = load_records(data, labeled=True)  # a class folder keeps its labels; UNLABELED rows stay in
    if any(r.split for r in records):
        return data.resolve(), None
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise DataError(f"{data}: no labelled images; the pipeline needs COVID/NORMAL/PNEUMONIA-style labels")
    path = out / "splits.csv"
    result = split_records(records, seed=seed, progress=progress)
    write_records(result.records, path)
    return path, result.pixel_hashes


def _audit(splits: Path, pixel_hashes: FileHashes[str] | None, progress: ProgressFn) -> dict[str, Any]:
    """The audit summary of the splits file; files in ``pixel_hashes`` are not pixel-hashed again."""
    report = audit_records(load_records(splits, labeled=False), progress=progress, pixel_hashes=pixel_hashes)
    return {"leakage": report.leakage, **report.summary(), "dominant_sources": report.dominant}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures a reader looks for first, each with its 95% interval when it was bootstrapped."""
    ci = metrics.get("ci", {})
    macro_ci = ci.get("macro", {})
    return {
        "n": metrics["n"],
        "accuracy": metrics["accuracy"],
        "accuracy_ci": ci.get("accuracy"),
        "macro_f1": metrics["macro"]["f1"],
        "macro_f1_ci": macro_ci.get("f1"),
        "macro_auc": metrics["macro"].get("auc"),
        "macro_auc_ci": macro_ci.get("auc"),
        "ece": metrics["calibration"]["ece"],
        "ci_unit": ci.get("unit"),
    }
