"""Classifier fine-tuning with gradual unfreezing (the paper's second phase).

Default: stage ``head`` trains the head over a frozen pretrained encoder (Adam 1e-3), then stage ``all``
trains everything (Adam 1e-5); each stage runs up to ``epochs`` epochs with early stopping (patience 5) on
validation cross-entropy and the best weights are restored before the next stage. The test split is
never loaded. Without ``--augment`` the ``head`` stage runs the frozen encoder once and trains the head on
its cached features (``cxrcae.train.features``): the same batches, losses and weights, many times faster;
``stages_run`` in config.json says so (``features_cached``).

Run folder (OUT):
  best/           checkpoint folder people use: model.safetensors + config.json (kind "classifier")
  last/           resume state after the latest epoch (see ``cxrcae.train.state``)
  history.csv     one row per epoch: stage, losses, validation accuracy / balanced accuracy / macro F1
  loss_curve.png  losses and validation accuracy per epoch, stage boundaries marked
  splits.csv      the train/val/test split, when DATA was split on the fly

When the encoder came from a CAE pretraining folder, ``best/`` also gets the out-of-distribution guard
(``ood.safetensors`` + the ``ood`` block of config.json; ``cxrcae.ood``): that autoencoder, with a
threshold from the training images' reconstruction errors. Otherwise a note says how to fit one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrcae.hub.resolve import encoder_state, resolve_encoder_checkpoint
from cxrcae.io.decoded import DecodedCache
from cxrcae.models.checkpoint import load_state_strict
from cxrcae.ood.fitting import guard_after_finetune
from cxrcae.paths import home_dir
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import precision_name, reproducible, resolve_device
from cxrcae.tasks import get_task
from cxrcae.train import distributed
from cxrcae.train.config import ENCODER_BLOCKS, FinetuneConfig, expand_stages
from cxrcae.train.data import (
    TrainData,
    augmentation,
    finetune_data,
)
from cxrcae.train.engine import (
    BEST,
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
from cxrcae.train.plots import loss_curves
from cxrcae.train.speed import training_precision

KIND = "finetune"


def finetune(
    data: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    progress: ProgressFn = no_progress,
) -> TrainResult:
    """Fine-tune a classifier on the labelled images of ``data`` into ``out_dir``."""
    cfg = cfg or FinetuneConfig()
    cfg.validate()
    out = check_out_dir(out_dir)
    with run_lock(out), reproducible(cfg.seed):  # one writer per run folder (cxrcae.locking)
        labelled = get_task(cfg.task).uses_label_column
        tdata = finetune_data(data, out, cfg.seed, progress, need_label=labelled)
        return run_finetune(tdata, out, cfg, progress)


def load_encoder_init(ref: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encoder tensors and their provenance (reference, kind, weights sha256, how it was trained)."""

    state, config = encoder_state(ref)
    provenance = {
        "ref": str(ref),
        "resolved": str(resolve_encoder_checkpoint(ref)),
        "kind": config.get("kind"),
        "weights_sha256": config.get("weights_sha256"),
        "image_size": config.get("image_size"),
        "resize_mode": config.get("resize_mode"),
        "dataset_fingerprint": (config.get("dataset") or {}).get("fingerprint"),
    }
    return state, provenance


def run_finetune(
    tdata: TrainData,
    out: Path,
    cfg: FinetuneConfig,
    progress: ProgressFn = no_progress,
    resume: Resume | None = None,
    encoder_provenance: dict[str, Any] | None = None,
    *,
    cache_features: bool = True,
) -> TrainResult:
    """Build classifier, datasets and stages for ``tdata`` and run (or continue) the epoch loop.

    ``cache_features=False`` keeps frozen-encoder stages on the images (``Run.cache_features``)."""

    task = get_task(cfg.task)
    targets = task.target_fields(tdata.train, tdata.val, cfg.target_source(), tdata.source)
    names = targets.get("class_names", [])
    # what config.json says about the network; the task rebuilds the model and its data from it
    network = {
        "task": task.name,
        "kind": task.kind,
        "head": cfg.head,
        "image_size": cfg.image_size,
        "in_chans": 3,
        **targets,
        "resize_mode": cfg.resize_mode,
    }

    device = distributed.local_device(resolve_device(cfg.device))  # cuda:LOCAL_RANK under torchrun
    dtype, channels_last = training_precision(cfg.precision, cfg.channels_last, device, cfg.image_size)
    rt = Runtime(device, dtype, channels_last)
    model = task.build(network)
    notes: list[str] = []
    if resume is None and cfg.encoder:
        enc, encoder_provenance = load_encoder_init(cfg.encoder)
        load_state_strict(model.encoder, enc, str(cfg.encoder))
    enc_info = encoder_provenance or {}
    if enc_info.get("image_size") not in (None, cfg.image_size):
        trained_at = enc_info["image_size"]
        notes.append(f"encoder was trained at {trained_at} px, fine-tuning at {cfg.image_size} px")
    if enc_info.get("resize_mode") not in (None, cfg.resize_mode):
        notes.append(
            f"encoder was trained with resize mode {enc_info['resize_mode']!r}, "
            f"fine-tuning uses {cfg.resize_mode!r} (the paper does the same: pad, then stretch)"
        )
    if not cfg.encoder and "head" in cfg.stages:
        notes.append("--encoder none: the 'head' stage trains over a frozen random encoder")
    model = rt.prepare(model)

    transform = augmentation() if cfg.augment else None
    decoded = DecodedCache(home_dir() / "decoded") if cfg.cache_decoded else None
    train_set = task.dataset(tdata.train, network, transform, decoded)
    val_set = task.dataset(tdata.val, network, decoded=decoded)
    weighting = task.weighting(train_set, tdata.train, cfg.balance)
    weight, sample_weights = weighting.loss_weight, weighting.sample_weights
    objective = task.objective(network, weight=weight)
    data_summary = tdata.summary(names)
    used = {
        "device": str(device),
        "precision": precision_name(dtype),
        "channels_last": rt.channels_last,
        "processes": distributed.current().size,  # torchrun: batch_size is per process
    }
    stages = [
        StagePlan(name, cfg.lr if name == "head" else cfg.lr_unfrozen, cfg.epochs)
        for name in expand_stages(cfg.stages)
    ]

    def model_config(summary: dict[str, Any]) -> dict[str, Any]:
        best = summary.get("best_metrics", {})
        learned = summary.get("best_fields") or {}  # e.g. thresholds chosen on validation at the best epoch
        return {
            **network,
            **learned,
            "training": {
                "task": KIND,
                "objective": objective.name + ("_class_weighted" if weight is not None else ""),
                **cfg.to_dict(),
                "stages": list(expand_stages(cfg.stages)),
                "class_weights": weight.tolist() if weight is not None else None,
                "used": used,
                **summary,
            },
            "dataset": data_summary,
            "encoder_init": encoder_provenance,
            "metrics": {"val": {k.removeprefix("val_"): v for k, v in best.items()}},
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
        stages=stages,
        set_stage=apply_stage,
        model_config=model_config,
        payload={
            "kind": KIND,
            "config": cfg.to_dict(),
            "data": data_summary,
            "encoder_init": encoder_provenance,
        },
        sample_weights=sample_weights,
        progress=progress,
        cache_features=cache_features,
    )
    outcome = fit(run, resume)
    if distributed.current().main:  # the guard's threshold from the training images, beside best/
        guard_note = guard_after_finetune(
            out / BEST,
            encoder_provenance,
            tdata.train,
            cfg.image_size,
            cfg.resize_mode,
            device=device,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            progress=progress,
        )
        notes.append(guard_note)

    curve = out / "loss_curve.png"
    if distributed.current().main:  # under torchrun the other processes write nothing
        loss_curves(outcome.history, curve, objective.name.replace("_", "-"))
    files = {"loss_curve": str(curve)}
    if tdata.split_origin != "file":
        files["splits"] = str(out / "splits.csv")
    if tdata.dropped_unlabeled:
        notes.append(f"{tdata.dropped_unlabeled} unlabelled image(s) ignored")
    notes += task.training_notes(tdata.train, cfg.balance)
    return train_result(
        run,
        outcome,
        len(tdata.train),
        len(tdata.val),
        best_metrics={"val_loss": outcome.best["val_loss"], **outcome.best.get("metrics", {})},
        files=files,
        class_names=names,
        notes=notes,
        resumed=resume is not None,
    )


# ----------------------------------------------------------------------------------------------- stages


def trainable_blocks(stage: str) -> tuple[str, ...]:
    """Encoder blocks a stage trains (the head always trains)."""
    if stage == "head":
        return ()
    if stage == "all":
        return ENCODER_BLOCKS
    return ENCODER_BLOCKS[ENCODER_BLOCKS.index(stage) :]


def apply_stage(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` on a ``CXRClassifier``; returns the parameters to optimise."""
    blocks = set(trainable_blocks(stage))
    for name, param in model.named_parameters():
        if name.startswith("encoder."):
            block = name.split(".")[2]  # encoder.stages.convN.weight
            param.requires_grad_(block in blocks)
        else:
            param.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
