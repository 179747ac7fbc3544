"""Autoencoder pretraining (the paper's unsupervised filter learning): MSE reconstruction with Adam.

Run folder (OUT):
  best/             checkpoint folder people use: model.safetensors + config.json (kind "autoencoder")
  last/             resume state after the latest epoch (see ``cxrcae.train.state``)
  history.csv       one row per epoch: losses, seconds, images/s, whether it was the best
  loss_curve.png    train/validation MSE per epoch
  reconstructions.png  validation inputs vs reconstructions of the best model
  splits.csv        the train/val hold-out, when DATA had no val split
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrcae.data import XrayDataset
from cxrcae.errors import ImageLoadError
from cxrcae.io.decoded import DecodedCache
from cxrcae.models import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.paths import home_dir
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import autocast, precision_name, reproducible, resolve_device
from cxrcae.tasks import get_task
from cxrcae.train import distributed
from cxrcae.train.config import PretrainConfig
from cxrcae.train.data import TrainData, augmentation, pretrain_data
from cxrcae.train.engine import (
    Resume,
    Run,
    Runtime,
    StagePlan,
    TrainResult,
    check_out_dir,
    fit,
    run_lock,
    train_result,
)
from cxrcae.train.plots import loss_curves, reconstruction_grid
from cxrcae.train.speed import training_precision

KIND = "pretrain"


def pretrain(
    data: str | Path,
    out_dir: str | Path,
    cfg: PretrainConfig | None = None,
    progress: ProgressFn = no_progress,
) -> TrainResult:
    """Train the convolutional autoencoder on the images of ``data`` (labels ignored) into ``out_dir``."""
    cfg = cfg or PretrainConfig()
    cfg.validate()
    out = check_out_dir(out_dir)
    with run_lock(out), reproducible(cfg.seed):  # one writer per run folder (cxrcae.locking)
        tdata = pretrain_data(data, out, cfg.val_fraction, cfg.seed, progress)
        return run_pretrain(tdata, out, cfg, progress)


def run_pretrain(
    tdata: TrainData,
    out: Path,
    cfg: PretrainConfig,
    progress: ProgressFn = no_progress,
    resume: Resume | None = None,
) -> TrainResult:
    """Build the model and datasets for ``tdata`` and run (or continue) the epoch loop."""

    device = distributed.local_device(resolve_device(cfg.device))  # cuda:LOCAL_RANK under torchrun
    dtype, channels_last = training_precision(cfg.precision, cfg.channels_last, device, cfg.image_size)
    rt = Runtime(device, dtype, channels_last)
    model = rt.prepare(ConvAutoencoder(CAEEncoder(), CAEDecoder()))

    decoded = DecodedCache(home_dir() / "decoded") if cfg.cache_decoded else None
    transform = augmentation() if cfg.augment else None
    train_set = XrayDataset(tdata.train, cfg.image_size, cfg.resize_mode, [], transform, decoded)
    val_set = XrayDataset(tdata.val, cfg.image_size, cfg.resize_mode, [], decoded=decoded)
    task = get_task("reconstruct")
    objective = task.objective({})  # also measures the mean-image baseline during the first validation
    data_summary = tdata.summary()
    used = {
        "device": str(device),
        "precision": precision_name(dtype),
        "channels_last": rt.channels_last,
        "processes": distributed.current().size,  # torchrun: batch_size is per process
    }

    def model_config(summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": task.name,
            "kind": task.kind,
            "head": None,
            "image_size": cfg.image_size,
            "in_chans": 3,
            "class_names": [],
            "resize_mode": cfg.resize_mode,
            "training": {
                "task": KIND,
                "objective": objective.name,
                **cfg.to_dict(),
                "used": used,
                **summary,
            },
            "dataset": data_summary,
            "encoder_init": None,
            "metrics": {"val": {"mse": summary["best_val_loss"]}},
            "baseline": objective.baseline,
        }

    run = Run(
        command=KIND,
        model=model,
        objective=objective,
        rt=rt,
        cfg=cfg,
        out_dir=out,
        train_set=train_set,
        val_set=val_set,
        stages=[StagePlan("all", cfg.lr, cfg.epochs)],
        model_config=model_config,
        payload={"kind": KIND, "config": cfg.to_dict(), "data": data_summary},
        progress=progress,
    )
    outcome = fit(run, resume)

    curve, grid = out / "loss_curve.png", out / "reconstructions.png"
    if distributed.current().main:  # under torchrun the other processes write nothing
        loss_curves(outcome.history, curve, "reconstruction MSE")
        _reconstructions(model, val_set, rt, cfg, grid)
    files = {"loss_curve": str(curve), "reconstructions": str(grid)}
    if tdata.split_origin != "file":
        files["splits"] = str(out / "splits.csv")
    notes = []
    best_loss = outcome.best["val_loss"]
    baseline = objective.baseline
    if best_loss is not None and baseline and best_loss >= baseline["val_mse_mean_image"]:
        notes.append(
            "validation MSE is not below the mean-image baseline: the autoencoder has not learned yet "
            "(train longer or check the learning rate)"
        )
    return train_result(
        run,
        outcome,
        len(tdata.train),
        len(tdata.val),
        best_metrics={"val_mse": best_loss},
        files=files,
        baseline=baseline,
        notes=notes,
        resumed=resume is not None,
    )


@torch.no_grad()
def _reconstructions(model, val_set: XrayDataset, rt: Runtime, cfg: PretrainConfig, path: Path) -> Path:
    """Grid of the first ``recon_samples`` readable validation images through the best model."""

    images = []
    for i in range(len(val_set)):
        if len(images) >= cfg.recon_samples:
            break
        try:
            images.append(val_set[i]["image"])
        except ImageLoadError:
            continue
    model.eval()
    x = torch.stack(images)
    batch = rt.images({"image": x})
    with autocast(rt.device, rt.dtype):
        recon = model(batch)
    inputs = x[:, 0].numpy()
    outputs = recon.float().cpu().mean(dim=1).numpy().astype(np.float32)
    return reconstruction_grid(inputs, outputs, path, f"best model, {cfg.image_size} px ({cfg.resize_mode})")
