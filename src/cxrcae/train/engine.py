"""The epoch loop shared by pretraining and fine-tuning: stages, early stopping, checkpoints, resume.

A run is a list of stages (pretraining has one); each stage builds a fresh Adam over the parameters it
trains, runs up to its epoch budget with early stopping on validation loss, and the next stage starts
from the best weights so far (Keras ``restore_best_weights`` semantics; a stage that never beats the
previous best leaves it in place). After every epoch OUT/history.csv and the resume state OUT/last/ are
rewritten; OUT/best/ is rewritten whenever the validation loss improves.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cxrcae._atomic import atomic_write_text
from cxrcae.hub.card import build_card
from cxrcae.models.checkpoint import load_state_strict, save_checkpoint
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.train.config import TrainConfig
from cxrcae.train.data import epoch_seed, make_loader
from cxrcae.train.loop import EpochStats, NonFiniteLossError, Runtime, evaluate, train_one_epoch
from cxrcae.train.state import optimizer_from_flat, restore_rng, save_resume_state
from cxrcae.train.stopping import EarlyStopping

BEST = "best"
HISTORY_NAME = "history.csv"


@dataclass(frozen=True)
class StagePlan:
    name: str
    lr: float
    epochs: int


@dataclass
class Run:
    """Everything the loop needs; built by ``pretrain`` / ``finetune``."""

    kind: str  # "pretrain" | "finetune"
    model: nn.Module
    objective: Any
    rt: Runtime
    cfg: TrainConfig
    out_dir: Path
    train_set: Dataset
    val_set: Dataset
    stages: list[StagePlan]
    set_stage: Callable[[nn.Module, str], list[nn.Parameter]]
    val_metrics: Callable[[EpochStats], dict[str, Any]]
    """Extra validation metrics of an epoch (e.g. accuracy), merged into the history row."""
    model_config: Callable[[dict[str, Any]], dict[str, Any]]
    """Builds the checkpoint config.json from the training summary so far."""
    payload: dict[str, Any]
    """JSON provenance saved in the resume state (data, settings) so ``--resume`` can rebuild the run."""
    sample_weights: torch.Tensor | None = None
    progress: ProgressFn = no_progress


@dataclass
class FitOutcome:
    history: list[dict[str, Any]]
    best: dict[str, Any]
    stages: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Training facts for config.json: epochs run, best epoch/loss/metrics, per-stage outcome."""
        return {
            "epochs_run": len(self.history),
            "best_epoch": self.best.get("epoch"),
            "best_val_loss": self.best.get("val_loss"),
            "best_metrics": self.best.get("metrics", {}),
            "stages_run": self.stages,
            "skipped_files": len(set(self.skipped)),
        }


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    columns: dict[str, None] = {}
    for row in history:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def fit(run: Run, resume: tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None = None):
    """Train ``run`` through its stages; returns a ``FitOutcome`` with the model holding the best weights."""

    cfg, model, out = run.cfg, run.model, run.out_dir
    history: list[dict[str, Any]] = []
    stage_log: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "val_loss": None, "metrics": {}}
    best_state: dict[str, torch.Tensor] | None = None
    stage_index, stage_epoch, epoch = 0, 0, 0
    stopper: EarlyStopping | None = None
    resume_optimizer: dict[str, Any] | None = None
    skipped: list[str] = []
    started = time.perf_counter()

    if resume is not None:
        state, tensors, weights = resume
        history, stage_log, best = state["history"], state["stages_run"], state["best"]
        stage_index, stage_epoch, epoch = state["stage_index"], state["stage_epoch"], state["epoch"]
        stopper = EarlyStopping.from_dict(state["stopper"])
        load_state_strict(model, weights, f"{out}/last")
        best_keys = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
        best_state = best_keys or None
        if stopper.stopped or stage_epoch >= run.stages[stage_index].epochs:
            stage_index, stopper = stage_index + 1, None  # that stage had finished: start the next one
        else:
            resume_optimizer = optimizer_from_flat(tensors, state["optimizer"])
        restore_rng(tensors, state["rng"])

    for si in range(stage_index, len(run.stages)):
        plan = run.stages[si]
        if stopper is None:  # a fresh stage starts from the best weights so far
            if best_state is not None:
                load_state_strict(model, {k: v for k, v in best_state.items()}, f"{out}/{BEST}")
            previous = best["val_loss"]
            stopper = EarlyStopping(
                cfg.patience,
                cfg.min_delta,
                best=math.inf if previous is None else previous,
                best_epoch=best["epoch"],
            )
            stage_epoch = 0
            stage_log.append({"name": plan.name, "lr": plan.lr, "epochs": 0, "best_epoch": None})
        params = run.set_stage(model, plan.name)
        optimizer = torch.optim.Adam(params, lr=plan.lr)
        if resume_optimizer is not None:
            optimizer.load_state_dict(resume_optimizer)
            resume_optimizer = None

        while stage_epoch < plan.epochs and not stopper.stopped:
            epoch += 1
            stage_epoch += 1
            label = f"{plan.name} {stage_epoch}/{plan.epochs}" if run.kind == "finetune" else ""
            task = f"epoch {epoch}" + (f" ({label})" if label else f"/{plan.epochs}")
            where = f"epoch {epoch}" + (f" (stage {plan.name})" if run.kind == "finetune" else "")
            loader = make_loader(
                run.train_set,
                cfg.batch_size,
                shuffle=True,
                seed=epoch_seed(cfg.seed, epoch),
                num_workers=cfg.num_workers,
                sample_weights=run.sample_weights,
                pin_memory=run.rt.device.type == "cuda",
            )
            val_loader = make_loader(
                run.val_set, cfg.batch_size, shuffle=False, seed=0, num_workers=cfg.num_workers
            )
            n_train = _n_batches(len(loader), cfg.limit_batches)
            n_val = _n_batches(len(val_loader), cfg.limit_batches)
            run.progress(task, 0, n_train + n_val)
            epoch_start = time.perf_counter()
            try:
                train = train_one_epoch(
                    model, loader, run.objective, optimizer, run.rt, where=where,
                    limit_batches=cfg.limit_batches, total=n_train + n_val, progress=run.progress, task=task,
                )  # fmt: skip
                val = evaluate(
                    model, val_loader, run.objective, run.rt, where=where, limit_batches=cfg.limit_batches,
                    progress=run.progress, task=task, offset=n_train, total=n_train + n_val,
                )  # fmt: skip
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(_nan_message(str(exc), out, best)) from None
            skipped += train.skipped + val.skipped
            improved = stopper.update(val.loss, epoch)
            row = {
                "epoch": epoch,
                "stage": plan.name,
                "stage_epoch": stage_epoch,
                "lr": plan.lr,
                "train_loss": train.loss,
                "val_loss": val.loss,
                **run.val_metrics(val),
                "train_images": train.images,
                "seconds": round(time.perf_counter() - epoch_start, 3),
                "images_per_s": round(train.images_per_s, 2),
                "best": int(improved),
            }
            history.append(row)
            metrics = {k: v for k, v in row.items() if k.startswith("val_")}
            run.progress(task, n_train + n_val, n_train + n_val, _epoch_info(row))
            stage_log[-1].update(epochs=stage_epoch, stopped_early=stopper.stopped)
            if improved:
                best_state = _clone_state(model)
                best = {"epoch": epoch, "stage": plan.name, "val_loss": val.loss, "metrics": metrics}
                stage_log[-1]["best_epoch"] = epoch
                outcome = FitOutcome(history, best, stage_log, skipped)
                _save_best(model, out, run.model_config(outcome.summary()))
            write_history(out / HISTORY_NAME, history)
            payload = {
                **run.payload,
                "history": history,
                "stages_run": stage_log,
                "best": best,
                "stage_index": si,
                "stage_epoch": stage_epoch,
                "epoch": epoch,
                "stopper": stopper.to_dict(),
            }
            outcome = FitOutcome(history, best, stage_log, skipped)
            save_resume_state(
                out, model, run.model_config(outcome.summary()), optimizer, payload,
                extra_tensors={f"best.{k}": v for k, v in (best_state or {}).items()},
            )  # fmt: skip
        stopper = None

    if best_state is not None:
        load_state_strict(model, best_state, f"{out}/{BEST}")
    outcome = FitOutcome(history, best, stage_log, skipped, time.perf_counter() - started)
    if best_state is not None:  # final config (epochs run, stages) next to the same best weights
        _save_best(model, out, run.model_config(outcome.summary()))
    return outcome


def _save_best(model: nn.Module, out: Path, config: dict[str, Any]) -> None:
    """OUT/best: weights + config.json + a README.md model card written from that config."""

    save_checkpoint(model, out / BEST, config, card=build_card(config))


def _n_batches(available: int, limit: int | None) -> int:
    return min(available, limit) if limit is not None else available


def _epoch_info(row: dict[str, Any]) -> str:
    parts = [f"train {row['train_loss']:.4g}", f"val {row['val_loss']:.4g}"]
    if "val_accuracy" in row:
        parts.append(f"acc {row['val_accuracy']:.3f}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    return " · ".join(parts) + (" *" if row["best"] else "")


def _nan_message(message: str, out: Path, best: dict[str, Any]) -> str:
    if best.get("epoch") is None:
        kept = "no checkpoint had been saved yet"
    else:
        kept = f"the best checkpoint (epoch {best['epoch']}) is kept in {out / BEST}"
    return f"{message}; stopped, {kept}. Try a lower --lr or --precision fp32."
