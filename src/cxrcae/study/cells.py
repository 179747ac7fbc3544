"""One cell of a study: an arm trained (or probed) on one labelled fraction, and its test scores.

A cell finishes by writing a marker file; a rerun reads the marker back instead of training again, and a
training run cut short is resumed from its last epoch (``cxrcae.train.resume_run``). Every cell of a
fraction is scored on the same test images, kept as ``eval.paired.Scores`` beside the marker so that any
two cells can be paired later without running a model again.

- ``finetune`` cells train each of the arm's recipes (``cxrcae.train.finetune``, any registered task) and
  keep the one with the lowest validation loss; its best checkpoint is run over the test split and the
  task turns the outputs into probabilities and the records into answers (``Task.probabilities`` /
  ``Task.targets``).
- ``probe`` cells fit a linear probe (``cxrcae.eval.probe``) on features encoded once per encoder for the
  whole study (cached in ``OUT/features/``), on the same nested fraction of the train patients.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrcae._atomic import atomic_open, atomic_write_text
from cxrcae.errors import CxrcaeError, DataError
from cxrcae.eval.paired import Scores
from cxrcae.eval.probe import Features, ProbeData, encode_records, fit_probe, write_probe
from cxrcae.hub.encoders import resolve_encoder
from cxrcae.hub.resolve import load
from cxrcae.infer.batches import collect_outputs
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import resolve_device, resolve_precision
from cxrcae.study.spec import Arm, Recipe, StudySpec, slug
from cxrcae.train import finetune, resume_run
from cxrcae.train.state import find_resume_folder

ARM_NAME = "arm.json"
"""A finished fine-tuning run's summary (the marker that it need not train again)."""
CELL_NAME = "cell.json"
"""A finished probe cell's summary."""
SCORES_NAME = "test-scores.npz"
"""config.json fields that may name a task's outputs, in the order they are looked for."""


# ----------------------------------------------------------------------------------------------- finetune


def finetune_cell(
    splits: Path, folder: Path, arm: Arm, spec: StudySpec, progress: ProgressFn = no_progress
) -> tuple[dict[str, Any], Scores]:
    """Train (or read back) every recipe of ``arm`` on ``splits`` into ``folder/<recipe>``; the summary of
    the one with the lowest validation loss, with ``chosen_from`` when there were several, and its scores."""
    runs = {r.name: trained(splits, folder / r.name, r, spec, progress) for r in arm.recipes}
    chosen = min(runs, key=lambda name: _finite(runs[name]["best_val_loss"]))
    summary = {"mode": arm.mode, **runs[chosen]}
    if len(runs) > 1:
        summary["chosen_from"] = {
            name: {"lr": run["lr"], "best_val_loss": run["best_val_loss"]} for name, run in runs.items()
        }
    scores_path = folder / chosen / SCORES_NAME
    if scores_path.exists():
        scores = Scores.load(scores_path)
    else:
        scores = checkpoint_scores(Path(runs[chosen]["best_dir"]), splits, spec, progress)
        scores.save(scores_path)
    return {**summary, "scores": str(scores_path)}, scores


def trained(
    splits: Path, folder: Path, recipe: Recipe, spec: StudySpec, progress: ProgressFn = no_progress
) -> dict[str, Any]:
    """The run's training summary, training (or resuming) it when it has not finished yet."""
    marker = folder / ARM_NAME
    if marker.exists():
        return json.loads(marker.read_text())
    result = continue_or_restart(folder, "finetune", spec, progress) if folder.exists() else None
    if result is None:
        result = finetune(splits, folder, recipe.config, progress)
    cfg = recipe.config
    summary = {
        "best_dir": str(result.best_dir),
        "recipe": ",".join(cfg.stages),
        "encoder": cfg.encoder or "random",
        "lr": cfg.lr if tuple(cfg.stages) == ("all",) else cfg.lr_unfrozen,
        "lr_head": cfg.lr if "head" in cfg.stages else None,
        "best_val_loss": result.best_val_loss,
        "epochs_run": result.epochs_run,
        "train_images": result.train_images,
        "seconds": result.seconds,
    }
    atomic_write_text(marker, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def continue_or_restart(folder: Path, task: str, spec: StudySpec, progress: ProgressFn = no_progress):
    """Resume an interrupted run; a folder with no resume state (killed before its first epoch) restarts."""
    try:
        find_resume_folder(folder)
    except CxrcaeError:
        shutil.rmtree(folder)
        return None
    return resume_run(folder, progress, task=task, device=spec.device, num_workers=spec.num_workers)


def checkpoint_scores(
    best: Path, splits: Path, spec: StudySpec, progress: ProgressFn = no_progress
) -> Scores:
    """The test scores of a fine-tuned checkpoint of any task, in fp32: its outputs on the test images of
    ``splits``, turned into probabilities and paired with the answers by the checkpoint's task."""
    device = resolve_device(spec.device)
    model = load(best, device)
    records = [r for r in spec.test_records(splits) if r.split == "test"]
    logits, ok, errors = collect_outputs(
        model.net,
        model.config,
        [str(r.path) for r in records],
        device,
        resolve_precision("fp32", device),
        batch_size=spec.batch_size,
        num_workers=spec.num_workers,
        progress=progress,
        task=f"test ({best.parent.name})",
    )
    if not ok:
        raise DataError(f"{splits}: none of the {len(records)} test images could be read")
    kept = [records[i] for i in ok]
    probs = model.probabilities(torch.from_numpy(np.asarray(logits)))
    targets = model.task.targets(kept, model.config)
    names = model.task.output_names(model.config)
    scores = Scores.from_outputs(
        [str(r.path) for r in kept],
        [r.patient_id for r in kept],
        targets,
        probs,
        [str(n) for n in names],
        model.config.get("thresholds"),
    )
    if errors:
        scores.notes.append(f"{len(errors)} unreadable test file(s) left out")
    return scores


def _finite(value: Any) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else math.inf


# ----------------------------------------------------------------------------------------------- probe


def probe_cell(
    folder: Path,
    arm: Arm,
    fraction: float,
    pdata: Callable[[], ProbeData],
    features: Callable[[], Features],
    spec: StudySpec,
) -> tuple[dict[str, Any], Scores]:
    """Fit (or read back) the linear probe of ``arm`` on ``fraction`` of the train patients; the records
    and features are asked for only when the cell has not finished yet."""
    marker, scores_path = folder / CELL_NAME, folder / SCORES_NAME
    if marker.exists() and scores_path.exists():
        return json.loads(marker.read_text()), Scores.load(scores_path)
    cfg = spec.probe
    result = fit_probe(
        pdata(), features(), fraction=fraction, seed=cfg.seed, c_grid=cfg.c_grid, n_bootstrap=cfg.n_bootstrap
    )
    write_probe(result, folder)
    scores = Scores.from_outputs(
        result.test_paths,
        result.test_groups,
        result.test_targets,
        result.test_probs,
        result.names,
        result.thresholds,
    )
    scores.save(scores_path)
    val_loss = next((c["val_log_loss"] for c in result.c_search if c["C"] == result.c), None)
    summary = {
        "mode": arm.mode,
        "encoder": arm.encoder,
        "recipe": "linear probe",
        "lr": None,
        "C": result.c,
        "best_val_loss": val_loss,
        "epochs_run": None,
        "train_images": result.counts["train"],
        "seconds": sum(result.seconds.values()),
        "encoder_info": result.encoder,
        "metrics": str(folder / "metrics.json"),
        "scores": str(scores_path),
    }
    atomic_write_text(marker, json.dumps(summary, indent=2, default=str) + "\n")
    return summary, scores


def study_features(
    out: Path, arm: Arm, pdata: ProbeData, spec: StudySpec, progress: ProgressFn = no_progress
) -> Features:
    """The pooled features of every study image under ``arm``'s encoder: encoded once, then read back from
    ``OUT/features/<encoder>.npz`` (with its description beside it) by every fraction and every rerun."""
    folder = out / "features"
    path, about = folder / f"{slug(arm.encoder)}.npz", folder / f"{slug(arm.encoder)}.json"
    paths = [str(r.path) for r in pdata.records]
    if path.exists() and about.exists():
        info = json.loads(about.read_text())
        if info.get("paths_sha") == _paths_sha(paths):
            with np.load(path, allow_pickle=False) as z:
                return Features(
                    values=z["values"],
                    ok=z["ok"],
                    errors=[tuple(e) for e in info["errors"]],
                    encoder=info["encoder"],
                    image_size=int(info["image_size"]),
                    seconds=float(info["seconds"]),
                )
    cfg = spec.probe
    start = time.perf_counter()
    encoder = resolve_encoder(arm.encoder, seed=cfg.seed)
    features = encode_records(
        encoder,
        paths,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=cfg.device,
        progress=progress,
    )
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.savez(f, values=features.values, ok=features.ok)
    info = {
        "encoder": features.encoder,
        "image_size": features.image_size,
        "errors": [list(e) for e in features.errors],
        "seconds": round(time.perf_counter() - start, 3),
        "paths_sha": _paths_sha(paths),
    }
    atomic_write_text(about, json.dumps(info, indent=2) + "\n")
    return features


def _paths_sha(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()
