"""Fit a classifier's out-of-distribution guard (``cxrcae calibrate-ood``); its decoder trains in the engine.

The guard is ``cxrcae.ood``'s: which images and autoencoder (``plan_fit``), the decoder's data and loss
(``cxrcae.ood.decoder``), the thresholds and the stored files (``store_fit``). What is left here is the one
thing that needs training: when the chosen autoencoder has no decoder, ``train_decoder`` trains a fresh one
on its frozen encoder through ``cxrcae.train.engine.fit``, with what every run gets there (autocast, the
non-finite loss check, progress, early stopping on a validation tenth, the best epoch kept). The run has no
folder: nothing is written until ``store_fit`` writes the guard.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cxrcae.models.cae import ConvAutoencoder
from cxrcae.ood.decoder import (
    DEFAULT_EPOCHS,
    LR,
    PATIENCE,
    DecoderReconstruction,
    encode_images,
    fresh_decoder,
    validation_split,
)
from cxrcae.ood.fitting import DEFAULT_MAX_IMAGES, check_settings, plan_fit, store_fit
from cxrcae.ood.thresholds import DEFAULT_QUANTILE
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import precision_name, reproducible, resolve_device, resolve_precision
from cxrcae.train.config import TrainConfig
from cxrcae.train.engine import NonFiniteLossError, Run, Runtime, StagePlan, fit

COMMAND = "calibrate-ood"


def calibrate_ood(
    model: str | Path,
    data: str | Path,
    *,
    autoencoder: str | Path | None = None,
    split: str | None = "train",
    epochs: int = DEFAULT_EPOCHS,
    quantile: float = DEFAULT_QUANTILE,
    max_images: int | None = DEFAULT_MAX_IMAGES,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    seed: int = 0,
    reuse_guard: bool = False,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Fit the OOD guard of the classifier folder ``model`` on the training X-rays of ``data`` and store it
    (``ood.safetensors`` + the ``ood`` block of config.json). Returns what was fitted, for the CLI.

    ``reuse_guard`` keeps the model's current guard autoencoder and re-fits only the thresholds (a new
    ``quantile``, or a new score) in seconds; with the same ``data``, ``max_images`` and ``seed`` as the fit
    that trained its decoder, the thresholds come from the same held-out images."""

    check_settings(epochs, quantile, max_images)
    start = time.perf_counter()
    plan = plan_fit(
        model,
        data,
        autoencoder=autoencoder,
        split=split,
        max_images=max_images,
        seed=seed,
        reuse_guard=reuse_guard,
    )
    dev = resolve_device(device)
    loading = {"batch_size": batch_size, "num_workers": num_workers, "device": dev, "progress": progress}
    with reproducible(seed):
        training = None
        if plan.decoder_images is not None:
            training = train_decoder(
                plan.cae,
                plan.decoder_images,
                plan.image_size,
                plan.resize_mode,
                epochs=epochs,
                seed=seed,
                **loading,
            )
        info = store_fit(plan, quantile, training, **loading)
    return {**info, "seconds": round(time.perf_counter() - start, 1)}


def train_decoder(
    cae: ConvAutoencoder,
    paths: Sequence[str],
    size: int,
    mode: str,
    *,
    epochs: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Give ``cae`` a decoder trained on its frozen encoder over ``paths`` (pretraining's MSE, Adam at ``LR``,
    up to ``epochs`` with early stopping); returns what the ``ood`` block records about the training."""
    train_paths, val_paths = validation_split(paths, seed)
    encoded = [
        encode_images(
            cae.encoder,
            part,
            size,
            mode,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
        )
        for part in (train_paths, val_paths)
    ]
    decoder = fresh_decoder(cae)
    dtype = resolve_precision("auto", device)
    cfg = TrainConfig(
        image_size=size,
        resize_mode=mode,
        epochs=epochs,
        batch_size=batch_size,
        lr=LR,
        seed=seed,
        device=str(device),
        precision=precision_name(dtype),
        patience=PATIENCE,
        min_delta=0.0,
    )
    run = Run(
        command=COMMAND,
        model=decoder,
        objective=DecoderReconstruction(),
        rt=Runtime(device, dtype),
        cfg=cfg,
        out_dir=None,  # in memory: the decoder is stored with the guard, or not at all
        train_set=encoded[0],
        val_set=encoded[1],
        stages=[StagePlan("decoder", LR, epochs)],
        model_config=dict,
        payload={},
        progress=lambda task, *rest: progress(f"guard decoder: {task}", *rest),
        cache_features=False,
    )
    try:
        outcome = fit(run)
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(
            f"the OOD guard's decoder: {exc}; nothing was written beside the model (try another --seed)"
        ) from None
    cae.decoder = decoder.eval()
    cae.requires_grad_(False)
    return {
        "images": len(encoded[0]) + len(encoded[1]),
        "train_images": len(encoded[0]),
        "val_images": len(encoded[1]),
        "epochs": epochs,
        "epochs_run": len(outcome.history),
        "best_epoch": outcome.best["epoch"],
        "lr": LR,
        "batch_size": batch_size,
        "precision": precision_name(dtype),
        "train_mse": [row["train_loss"] for row in outcome.history],
        "val_mse": [row["val_loss"] for row in outcome.history],
    }
