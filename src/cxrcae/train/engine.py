"""The training engine shared by pretraining and fine-tuning, in reading order (nanoGPT style).

1. What a run is made of: where tensors live (``Runtime``), the objective (its task's: ``cxrcae.tasks``, so
   the engine never asks which task it trains), the optimiser (``cxrcae.train.optim``, named in the config),
   the stages (``StagePlan``), early stopping, and what a run returns (``TrainResult``).
2. One epoch: ``train_one_epoch`` (frozen modules stay in eval mode) and ``validate`` (no gradients).
3. The loop: ``fit`` runs the stages. Each stage builds a fresh optimiser over the parameters it trains and
   runs up to its epoch budget with early stopping on validation loss; the next stage starts from the best
   weights so far (Keras ``restore_best_weights`` semantics). After every epoch OUT/history.csv and the resume
   state OUT/last/ are rewritten (``cxrcae.train.state``; a first one before epoch 1); OUT/best/ whenever the
   validation loss improves. These writes finish before a Ctrl-C takes effect, and an interrupted run says how
   to resume it; a SIGKILL at any moment costs at most the epoch in progress (``--resume``). A run holds its
   folder's lock (``run_lock``) from start to end, so a second command cannot write into it. A stage that
   trains no encoder parameter, without augmentation, runs the encoder once and trains the head on its cached
   features (``cxrcae.train.features``): the same batches and results, far faster. Under ``torchrun`` this
   process is one of several (``cxrcae.train.distributed``): the training step runs through DDP on this
   process's share of every epoch's batches, every process validates and takes rank 0's validation loss, and
   only rank 0 writes files and reports progress. A run without a folder (``out_dir=None``: the OOD guard's
   decoder, ``cxrcae.train.guard``) writes nothing and cannot be resumed; its model ends on the best weights.

Losses are computed in fp32 even under bf16/fp16 autocast; a non-finite loss stops the run at once naming
the epoch and step, and keeps the last good checkpoint.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrcae._atomic import atomic_write_text, uninterrupted
from cxrcae.errors import CxrcaeError, add_note
from cxrcae.hub.card import build_card
from cxrcae.locking import hold
from cxrcae.models.checkpoint import load_state_strict, save_checkpoint
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, precision_name
from cxrcae.tasks import Objective
from cxrcae.train import distributed
from cxrcae.train.config import TrainConfig
from cxrcae.train.data import epoch_seed, make_loader
from cxrcae.train.features import HeadOnly, encode, use_cached_features
from cxrcae.train.optim import make_optimizer
from cxrcae.train.state import LAST, optimizer_from_flat, restore_rng, save_resume_state, saved_epoch

BEST = "best"
HISTORY_NAME = "history.csv"
RUN_MARKERS = (BEST, LAST, ".last-tmp", HISTORY_NAME)

# ----------------------------------------------------------------------------------------------- 1. parts


class NonFiniteLossError(CxrcaeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass(frozen=True)
class Runtime:
    """Where tensors live and how they are computed: device, autocast dtype (None = fp32), memory format."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"].to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass(frozen=True)
class StagePlan:
    name: str
    lr: float
    epochs: int


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta`` (Keras semantics).

    ``best`` may start from a previous stage's best value, so a later stage that never beats it ends with
    the earlier weights restored. It travels in the resume state as a dict.
    """

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; True when it is a new best (the caller then saves weights)."""
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.stopped = True
        return False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["best"] = None if math.isinf(self.best) else self.best
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EarlyStopping:
        values = dict(data)
        values["best"] = math.inf if values.get("best") is None else float(values["best"])
        return cls(**values)


@dataclass
class Run:
    """Everything ``fit`` needs; built by ``pretrain`` / ``finetune`` (and, without a folder, by
    ``cxrcae.train.guard`` for the OOD guard's decoder)."""

    command: str
    """The command that resumes this run (``cxrcae COMMAND --resume OUT``): "pretrain" | "finetune"."""
    model: nn.Module
    objective: Objective
    rt: Runtime
    cfg: TrainConfig
    out_dir: Path | None
    """The run folder (best/, last/, history.csv); None trains in memory only."""
    train_set: Dataset
    val_set: Dataset
    stages: list[StagePlan]
    model_config: Callable[[dict[str, Any]], dict[str, Any]]
    """Builds the checkpoint config.json from the training summary so far."""
    payload: dict[str, Any]
    """JSON provenance saved in the resume state (data, settings) so ``--resume`` can rebuild the run."""
    set_stage: Callable[[nn.Module, str], list[nn.Parameter]] | None = None
    """Freezes what a stage does not train and returns the parameters to optimise (None: all of them)."""
    sample_weights: torch.Tensor | None = None
    progress: ProgressFn = no_progress
    cache_features: bool = True
    """Run a stage that trains no encoder parameter on features computed once (``cxrcae.train.features``);
    False keeps every stage on the images (tests compare the two paths)."""


@dataclass
class TrainResult:
    """Summary of a finished run (what ``--json`` prints); the files it lists are in the run folder."""

    task: str  # the command that trained it: "pretrain" | "finetune"
    out_dir: str
    best_dir: str
    device: str
    precision: str
    epochs_run: int
    best_epoch: int | None
    best_val_loss: float | None
    best_metrics: dict[str, Any]
    stages: list[dict[str, Any]]
    history: list[dict[str, Any]]
    train_images: int
    val_images: int
    seconds: float
    files: dict[str, str]
    class_names: list[str] = field(default_factory=list)
    baseline: dict[str, Any] | None = None
    skipped_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_lock(out_dir: str | Path):
    """``with run_lock(OUT):`` the run folder is this run's until the block ends (``cxrcae.locking``): a
    second pretrain, finetune or resume of OUT is refused, naming this process. Under torchrun the
    processes are one run: rank 0, the one that writes, holds the lock."""
    return hold(out_dir, folder=True) if distributed.current().main else nullcontext()


def check_out_dir(out_dir: str | Path) -> Path:
    """Create OUT, refusing one that already holds a run (it would mix two runs' files)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CxrcaeError(f"{out}: exists and is not a folder")
    if any((out / name).exists() for name in RUN_MARKERS):
        raise CxrcaeError(
            f"{out}: already holds a training run; continue it with --resume {out} or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------- 2. one epoch


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, then every module whose parameters are all frozen goes back to eval mode.

    A frozen encoder must behave exactly as at inference (dropout/normalisation layers, if any, must not
    update or randomise), so "frozen" means both no gradient and eval mode.
    """
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
    return model


def _scored_batches(
    model, loader: Iterable, objective, rt: Runtime, limit: int | None, skipped: list, what: str
):
    """(step, n, loss tensor, loss value, outputs, labels) for each readable batch, under autocast.

    Unreadable files are appended to ``skipped``; a non-finite loss stops the run naming ``what`` and step.
    """
    for step, batch in enumerate(loader, start=1):
        if limit is not None and step > limit:
            return
        skipped += batch.get("skipped", [])
        if len(batch["image"]) == 0:
            continue
        images = rt.images(batch)
        labels = batch["label"].to(rt.device, non_blocking=True)
        with autocast(rt.device, rt.dtype):
            loss, out = objective(model, images, labels)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss became {value} at {what} step {step}")
        yield step, len(images), loss, value, out, labels


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    objective,
    optimizer: torch.optim.Optimizer,
    rt: Runtime,
    *,
    where: str,
    limit_batches: int | None = None,
    total: int | None = None,
    progress: ProgressFn = no_progress,
    task: str = "train",
) -> EpochStats:
    """One optimisation pass over ``loader``."""
    train_mode(model)
    loss_sum, seen, skipped = 0.0, 0, []
    start = time.perf_counter()
    batches = _scored_batches(model, loader, objective, rt, limit_batches, skipped, f"{where}, training")
    for step, n, loss, value, _, _ in batches:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += value * n
        seen += n
        rate = seen / max(time.perf_counter() - start, 1e-9)
        progress(task, step, total, f"train loss {loss_sum / seen:.4g} · {rate:.1f} img/s")
    if seen == 0:
        raise CxrcaeError(f"{where}: no training image could be read")
    return EpochStats(loss_sum / seen, seen, time.perf_counter() - start, skipped)


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: Iterable,
    objective,
    rt: Runtime,
    *,
    where: str = "validation",
    limit_batches: int | None = None,
    progress: ProgressFn = no_progress,
    task: str = "validate",
    offset: int = 0,
    total: int | None = None,
) -> EpochStats:
    """Mean loss in eval mode; every batch's outputs go to ``objective.observe`` for its metrics.
    Restores the previous mode."""
    was_training = model.training
    model.eval()
    objective.start_validation()
    loss_sum, seen, skipped = 0.0, 0, []
    start = time.perf_counter()
    try:
        batches = _scored_batches(
            model, loader, objective, rt, limit_batches, skipped, f"{where}, validation"
        )
        for step, n, _, value, out, y in batches:
            loss_sum += value * n
            seen += n
            objective.observe(out, y)
            progress(task, offset + step, total, f"val loss {loss_sum / seen:.4g}")
    finally:
        model.train(was_training)
    if seen == 0:
        raise CxrcaeError(f"{where}: no validation image could be read")
    return EpochStats(loss_sum / seen, seen, time.perf_counter() - start, skipped)


# ----------------------------------------------------------------------------------------------- 3. the loop


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
            "best_fields": self.best.get("fields", {}),
            "skipped_files": len(set(self.skipped)),
        }


Resume = tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]


def fit(run: Run, resume: Resume | None = None) -> FitOutcome:
    """Train ``run`` through its stages; returns a ``FitOutcome`` with the model holding the best weights.

    Under torchrun, inside the process group of the run's processes (a plain run opens none). An
    interrupted run (Ctrl-C) re-raises ``KeyboardInterrupt`` with a note saying how to resume it."""
    with distributed.process_group(run.rt.device) as world:
        if not world.main:
            run = replace(run, progress=no_progress)
        try:
            return _fit(run, resume, world)
        except KeyboardInterrupt as exc:
            if world.main:
                add_note(exc, _resume_note(run))
            raise


def _resume_note(run: Run) -> str:
    if run.out_dir is None:
        return "a run without a folder keeps nothing: run the same command again"
    epoch = saved_epoch(run.out_dir)
    if epoch is None:
        return "nothing was saved yet: run the same command again"
    done = f"saved after epoch {epoch}" if epoch else "saved before its first epoch"
    return f"the run is {done}: continue it with `cxrcae {run.command} --resume {run.out_dir}`"


def _fit(run: Run, resume: Resume | None, world: distributed.World) -> FitOutcome:
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
        stopper = EarlyStopping.from_dict(state["stopper"]) if state.get("stopper") else None
        run.objective.load_state(state.get("objective") or {})
        load_state_strict(model, weights, f"{out}/{LAST}")
        best_state = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")} or None
        if stopper is None:
            pass  # saved before its first epoch: the stage starts afresh
        elif stopper.stopped or stage_epoch >= run.stages[stage_index].epochs:
            stage_index, stopper = stage_index + 1, None  # that stage had finished: start the next one
        else:
            resume_optimizer = optimizer_from_flat(tensors, state["optimizer"])
        restore_rng(tensors, state["rng"])
    elif world.main and out is not None:  # the first resume state: a run stopped in epoch 1 resumes from here
        with uninterrupted():
            start = {"stage_index": 0, "stage_epoch": 0, "epoch": 0}
            config = run.model_config(FitOutcome(history, best, stage_log).summary())
            _save_state(run, None, start, history, stage_log, best, None, None, config)

    # built once; the training order of each epoch comes from reseeding its generator (see epoch_seed)
    train_loader, val_loader = _loaders(run, run.train_set, run.val_set, cfg.num_workers, world)
    n_train = min(len(train_loader), cfg.limit_batches or len(train_loader))
    n_val = min(len(val_loader), cfg.limit_batches or len(val_loader))

    for si in range(stage_index, len(run.stages)):
        plan = run.stages[si]
        if stopper is None:  # a fresh stage starts from the best weights so far
            if best_state is not None:
                load_state_strict(model, best_state, f"{out}/{BEST}")
            previous = best["val_loss"]
            stopper = EarlyStopping(
                cfg.patience,
                cfg.min_delta,
                best=math.inf if previous is None else previous,
                best_epoch=best["epoch"],
            )
            stage_epoch = 0
            stage_log.append({"name": plan.name, "lr": plan.lr, "epochs": 0, "best_epoch": None})
        params = run.set_stage(model, plan.name) if run.set_stage else list(model.parameters())
        optimizer = make_optimizer(cfg, params, plan.lr)
        if resume_optimizer is not None:
            optimizer.load_state_dict(resume_optimizer)
            resume_optimizer = None
        # what this stage's epochs run on: the model over the images, or its head over cached features
        net, loaders = model, (train_loader, val_loader)
        cached = run.cache_features and use_cached_features(model, cfg)
        stage_log[-1]["features_cached"] = cached
        if cached:
            net, loaders = HeadOnly(model), _feature_loaders(run, plan.name, stage_log[-1], world)
        stage_train, stage_val = loaders
        train_net = distributed.wrap(net, world, run.rt.device)  # DDP in a torchrun world, else ``net``

        while stage_epoch < plan.epochs and not stopper.stopped:
            epoch += 1
            stage_epoch += 1
            staged = run.set_stage is not None  # stages that freeze and unfreeze are named in the logs
            task = f"epoch {epoch}" + (
                f" ({plan.name} {stage_epoch}/{plan.epochs})" if staged else f"/{plan.epochs}"
            )
            where = f"epoch {epoch}" + (f" (stage {plan.name})" if staged else "")
            stage_train.generator.manual_seed(epoch_seed(cfg.seed, epoch))
            run.progress(task, 0, n_train + n_val)
            epoch_start = time.perf_counter()
            try:
                train = train_one_epoch(
                    train_net, stage_train, run.objective, optimizer, run.rt, where=where,
                    limit_batches=cfg.limit_batches, total=n_train + n_val, progress=run.progress, task=task,
                )  # fmt: skip
                val = validate(
                    net, stage_val, run.objective, run.rt, where=where, limit_batches=cfg.limit_batches,
                    progress=run.progress, task=task, offset=n_train, total=n_train + n_val,
                )  # fmt: skip
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(_nan_message(str(exc), out, best)) from None
            skipped += train.skipped + val.skipped
            val.loss = distributed.from_rank0(val.loss, world, run.rt.device)  # one decision everywhere
            improved = stopper.update(val.loss, epoch)
            row = {
                "epoch": epoch,
                "stage": plan.name,
                "stage_epoch": stage_epoch,
                "lr": plan.lr,
                "train_loss": train.loss,
                "val_loss": val.loss,
                **run.objective.epoch_metrics(val),
                "train_images": train.images,
                "seconds": round(time.perf_counter() - epoch_start, 3),
                "images_per_s": round(train.images_per_s, 2),
                "best": int(improved),
            }
            history.append(row)
            run.progress(task, n_train + n_val, n_train + n_val, _epoch_info(row, run.objective))
            stage_log[-1].update(epochs=stage_epoch, stopped_early=stopper.stopped)
            if improved:
                best_state = _clone_state(model)
                metrics = {k: v for k, v in row.items() if k.startswith("val_")}
                best = {"epoch": epoch, "stage": plan.name, "val_loss": val.loss, "metrics": metrics}
                fields = run.objective.epoch_fields()  # what the task learned on this validation
                if fields:
                    best["fields"] = fields
                stage_log[-1]["best_epoch"] = epoch
            if not world.main or out is None:
                continue  # the others hold the same weights; they, and a run without a folder, write nothing
            position = {"stage_index": si, "stage_epoch": stage_epoch, "epoch": epoch}
            with uninterrupted():  # a Ctrl-C from here on takes effect once the epoch is saved
                config = run.model_config(FitOutcome(history, best, stage_log, skipped).summary())
                if improved:
                    _save_best(model, out, config)
                write_history(out / HISTORY_NAME, history)
                _save_state(run, optimizer, position, history, stage_log, best, stopper, best_state, config)
        stopper = None

    if best_state is not None:
        load_state_strict(model, best_state, f"{out}/{BEST}")
    outcome = FitOutcome(history, best, stage_log, skipped, time.perf_counter() - started)
    if best_state is not None and world.main and out is not None:  # final config next to the best weights
        with uninterrupted():
            _save_best(model, out, run.model_config(outcome.summary()))
    return outcome


def _save_state(
    run: Run,
    optimizer: torch.optim.Optimizer | None,
    position: dict[str, int],
    history: list[dict[str, Any]],
    stage_log: list[dict[str, Any]],
    best: dict[str, Any],
    stopper: EarlyStopping | None,
    best_state: dict[str, torch.Tensor] | None,
    config: dict[str, Any],
) -> None:
    """OUT/last after ``position`` (``cxrcae.train.state``), with checkpoint ``config``.

    Written after OUT/best and history.csv: a kill before it resumes from the previous state and writes
    the same best/ and history again."""
    payload = {
        **run.payload,
        **position,
        "history": history,
        "stages_run": stage_log,
        "best": best,
        "stopper": stopper.to_dict() if stopper is not None else None,
        "objective": run.objective.state(),
    }
    save_resume_state(
        run.out_dir, run.model, config, optimizer, payload,
        extra_tensors={f"best.{k}": v for k, v in (best_state or {}).items()},
    )  # fmt: skip


def _loaders(
    run: Run, train_set: Dataset, val_set: Dataset, num_workers: int, world: distributed.World
) -> tuple[DataLoader, DataLoader]:
    """The train loader (shuffled, or sampled with ``run.sample_weights``; ``fit`` reseeds its generator every
    epoch; in a torchrun ``world``, this process's share of it) and the val loader (in order, all of it).
    Over ``CachedFeatures`` built the same way, they give the same batches as over the images."""
    cfg = run.cfg
    train = make_loader(
        train_set,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=num_workers,
        sample_weights=run.sample_weights,
        pin_memory=run.rt.device.type == "cuda",
        world=world,
    )
    val = make_loader(val_set, cfg.batch_size, shuffle=False, seed=0, num_workers=num_workers)
    return train, val


def _feature_loaders(
    run: Run, stage: str, log: dict[str, Any], world: distributed.World
) -> tuple[DataLoader, DataLoader]:
    """Run the frozen encoder once over the train and val images (in order, in the run's batch size) and
    return ``_loaders`` over the features; ``log`` (the stage's entry) gets the time and memory it took.
    Under torchrun every process encodes every image (its share of each epoch differs from epoch to epoch)."""
    cfg, start = run.cfg, time.perf_counter()
    train_images, val_images = (
        make_loader(images, cfg.batch_size, shuffle=False, seed=0, num_workers=cfg.num_workers)
        for images in (run.train_set, run.val_set)
    )
    task, total = f"stage {stage}: encoder features", len(train_images) + len(val_images)
    report = {"progress": run.progress, "task": task, "total": total}
    train = encode(run.model, train_images, run.rt, **report)
    val = encode(run.model, val_images, run.rt, offset=len(train_images), **report)
    log["features_seconds"] = round(time.perf_counter() - start, 3)
    log["features_mb"] = round((train.nbytes() + val.nbytes()) / 2**20, 3)
    # in memory already: worker processes would only copy the features between processes
    return _loaders(run, train, val, 0, world)


def train_result(
    run: Run, outcome: FitOutcome, train_images: int, val_images: int, **extra: Any
) -> TrainResult:
    """The ``TrainResult`` of a finished ``fit``: what both tasks report the same way, plus ``extra``
    (best_metrics, files beyond best/last/history, notes, class names, baseline, resumed)."""
    out = run.out_dir
    files = {"best": str(out / BEST), "last": str(out / LAST), "history": str(out / HISTORY_NAME)}
    return TrainResult(
        task=run.command,
        out_dir=str(out),
        best_dir=str(out / BEST),
        device=str(run.rt.device),
        precision=precision_name(run.rt.dtype),
        epochs_run=len(outcome.history),
        best_epoch=outcome.best["epoch"],
        best_val_loss=outcome.best["val_loss"],
        best_metrics=extra.pop("best_metrics"),
        stages=outcome.stages,
        history=outcome.history,
        train_images=train_images,
        val_images=val_images,
        seconds=round(outcome.seconds, 2),
        files={**files, **extra.pop("files", {})},
        skipped_files=sorted(set(outcome.skipped)),
        **extra,
    )


# ----------------------------------------------------------------------------------------------- files


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


def _save_best(model: nn.Module, out: Path, config: dict[str, Any]) -> None:
    """OUT/best: weights + config.json + a README.md model card written from that config."""
    save_checkpoint(model, out / BEST, config, card=build_card(config))


def _epoch_info(row: dict[str, Any], objective: Objective) -> str:
    parts = [f"train {row['train_loss']:.4g}", f"val {row['val_loss']:.4g}"]
    shown = next((m for m in objective.monitor_metrics if m in row), None)
    if shown is not None:  # the task's headline metric, e.g. val_accuracy -> "accuracy 0.912"
        parts.append(f"{shown.removeprefix('val_')} {row[shown]:.3f}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    return " · ".join(parts) + (" *" if row["best"] else "")


def _nan_message(message: str, out: Path | None, best: dict[str, Any]) -> str:
    """``message`` and what the run kept; a run without a folder kept nothing (its caller says what that
    means for the user)."""
    if out is None:
        return message
    if best.get("epoch") is None:
        kept = "no checkpoint had been saved yet"
    else:
        kept = f"the best checkpoint (epoch {best['epoch']}) is kept in {out / BEST}"
    return f"{message}; stopped, {kept}. Try a lower --lr or --precision fp32."
