"""Fitting a guard, in two steps around an optional decoder training: ``plan_fit`` chooses the images and the
autoencoder, ``store_fit`` scores the held-out images, sets the thresholds and stores the guard.

``cxrcae calibrate-ood`` is ``cxrcae.train.guard.calibrate_ood``: these two steps, with a decoder trained by
the engine between them when the autoencoder has none (``cxrcae.ood.sources``). ``guard_after_finetune``
needs no training: fine-tuning that started from a CAE pretraining folder finds the decoder there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrcae.data import dataset_fingerprint
from cxrcae.data.records import Record
from cxrcae.errors import CheckpointError, CxrcaeError, DataError
from cxrcae.hub.resolve import in_hub_cache, load_checkpoint, resolve_checkpoint
from cxrcae.models.cae import ConvAutoencoder
from cxrcae.models.checkpoint import read_config
from cxrcae.ood.guard import save_guard
from cxrcae.ood.selection import fit_records, hold_out, subsample
from cxrcae.ood.sources import current_guard, guard_autoencoder, provenance
from cxrcae.ood.thresholds import DEFAULT_QUANTILE, MIN_SCORED, as_stored, score_paths, threshold_block
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import reproducible

DEFAULT_MAX_IMAGES = 5000
"""A 99.5% quantile is well estimated from ~1,000 held-out scores; more images cost time."""


@dataclass
class GuardFit:
    """What ``plan_fit`` chose for the guard of the classifier folder ``folder``."""

    folder: Path
    cae: ConvAutoencoder
    image_size: int
    resize_mode: str
    scored: list[str]
    """The images the thresholds are set on."""
    decoder_images: list[str] | None
    """The images to train a fresh decoder on (none of ``scored``); None keeps the autoencoder's decoder."""
    source: dict[str, Any]
    """Where the autoencoder came from (``cxrcae.ood.sources``), for the ``ood`` block."""
    data: dict[str, Any]
    notes: list[str]
    held_out: bool
    """Whether ``scored`` was kept from the decoder's training (now or in the fit that trained it)."""
    fitted_by: str


def check_settings(epochs: int, quantile: float, max_images: int | None) -> None:
    """Refuse, in one line, settings no guard can be fitted with."""
    if int(epochs) < 1:
        raise CxrcaeError(f"decoder epochs must be at least 1, got {epochs}")
    if not 0.5 <= float(quantile) < 1.0:
        raise CxrcaeError(f"the threshold quantile must be in [0.5, 1), got {quantile}")
    if max_images is not None and int(max_images) < 2 * MIN_SCORED:
        raise CxrcaeError(f"max images must be at least {2 * MIN_SCORED}, got {max_images}")


def plan_fit(
    model: str | Path,
    data: str | Path,
    *,
    autoencoder: str | Path | None = None,
    split: str | None = "train",
    max_images: int | None = DEFAULT_MAX_IMAGES,
    seed: int = 0,
    reuse_guard: bool = False,
) -> GuardFit:
    """The images and the autoencoder of a guard fit for the local classifier folder ``model``.

    ``reuse_guard`` keeps the model's current guard autoencoder (only the thresholds are fitted again); with
    the same ``data``, ``max_images`` and ``seed`` as the fit that trained its decoder, the thresholds come
    from the same held-out images."""
    folder = resolve_checkpoint(model)
    if in_hub_cache(folder):
        raise CheckpointError(
            "the OOD guard is stored beside the model, which needs a local checkpoint folder; download the "
            "model to a folder first (e.g. `hf download REPO --local-dir DIR`)"
        )
    config = read_config(folder)
    if config.get("kind") != "classifier":
        raise CheckpointError(
            f"{model} is a checkpoint of kind {config.get('kind')!r}; the OOD guard sits beside a "
            "fine-tuned classifier"
        )
    records, data_info = fit_records(data, folder, split, max_images, seed)
    if reuse_guard:
        cae, has_decoder, source = current_guard(folder, config, data_info)
    else:
        cae, has_decoder, source = guard_autoencoder(config, folder, autoencoder)
    paths = [str(r.path) for r in records]
    notes = list(source.pop("notes", []))
    scored, decoder_images = (paths, None) if has_decoder else hold_out(paths, seed, data)
    return GuardFit(
        folder=folder,
        cae=cae,
        image_size=int(config["image_size"]),
        resize_mode=str(config.get("resize_mode", "stretch")),
        scored=scored,
        decoder_images=None if reuse_guard else decoder_images,
        source=source,
        data=data_info,
        notes=notes,
        held_out=not has_decoder,
        fitted_by="calibrate-ood" + (" --reuse-guard" if reuse_guard else ""),
    )


def store_fit(
    fit: GuardFit,
    quantile: float = DEFAULT_QUANTILE,
    training: dict[str, Any] | None = None,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Score ``fit.scored`` with the autoencoder as stored (float16), set both thresholds at ``quantile``
    and write the guard beside the model; ``training`` is what training its decoder gave (None when it
    kept its decoder). Returns what was fitted, for the CLI."""
    cae = as_stored(fit.cae)
    size, mode = fit.image_size, fit.resize_mode
    scores, errors = score_paths(cae, fit.scored, size, mode, batch_size, num_workers, device, progress)
    if len(scores) < MIN_SCORED:
        raise DataError(f"{fit.data['source']}: only {len(scores)} readable image(s) to set the threshold on")
    notes = list(fit.notes)
    if errors:
        notes.append(f"{len(errors)} unreadable image(s) left out")
    block = threshold_block(scores, quantile, size, mode)
    block["autoencoder"] = {
        "decoder": "trained on the frozen encoder" if training else "as trained",
        **fit.source,
    }
    if training:
        block["autoencoder"]["decoder_training"] = training
    block["data"] = {**fit.data, "scored_images": len(scores), "held_out_from_decoder": fit.held_out}
    block["fitted_by"] = fit.fitted_by
    stored = save_guard(fit.folder, cae, block)
    return {
        "config": str(fit.folder / "config.json"),
        "file": str(fit.folder / stored["file"]),
        "threshold": stored["threshold"],
        "relative_threshold": stored["relative_threshold"],
        "quantile": quantile,
        "n_images": stored["n_images"],
        "distribution": stored["distribution"],
        "decoder_trained": training is not None,
        "decoder_training": training,
        "autoencoder": stored["autoencoder"],
        "data": stored["data"],
        "notes": notes,
    }


def guard_after_finetune(
    best_dir: Path,
    encoder_provenance: dict[str, Any] | None,
    records: Sequence[Record],
    image_size: int,
    resize_mode: str,
    *,
    device: torch.device,
    batch_size: int = 32,
    max_images: int | None = DEFAULT_MAX_IMAGES,
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> str:
    """Write the guard into a fine-tuning run's ``best/`` when it started from a CAE pretraining folder
    (its decoder is there); returns a one-line note saying what was done or why not."""

    info = encoder_provenance or {}
    hint = "fit one with `cxrcae calibrate-ood BEST_DIR DATA`"
    if info.get("kind") != "autoencoder":
        what = f"an {info['kind']} checkpoint" if info.get("kind") else "no pretrained encoder"
        return f"no OOD guard written: fine-tuning started from {what}, which has no decoder; {hint}"
    try:
        cae, config = load_checkpoint(info.get("resolved") or info["ref"], "cpu")
    except CxrcaeError as exc:
        return f"no OOD guard written: the pretraining folder could not be read ({exc}); {hint}"
    if config.get("weights_sha256") != info.get("weights_sha256"):
        return f"no OOD guard written: {info.get('ref')} changed since fine-tuning started; {hint}"
    chosen = subsample(records, max_images, seed)
    paths = [str(r.path) for r in chosen]
    cae = as_stored(cae)
    with reproducible(seed):
        scores, _ = score_paths(cae, paths, image_size, resize_mode, batch_size, 0, device, progress)
    if len(scores) < MIN_SCORED:
        return f"no OOD guard written: only {len(scores)} readable training image(s); {hint}"
    block = threshold_block(scores, DEFAULT_QUANTILE, image_size, resize_mode)
    block["autoencoder"] = {**provenance(info.get("ref"), config), "decoder": "as trained"}
    block["data"] = {
        "source": "the fine-tuning run's train split",
        "split": "train",
        "images": len(chosen),
        "fingerprint": dataset_fingerprint(chosen),
        "scored_images": len(scores),
        "held_out_from_decoder": False,
    }
    block["fitted_by"] = "finetune"
    stored = save_guard(best_dir, cae, block)
    return (
        f"OOD guard written (thresholds at the {DEFAULT_QUANTILE:.1%} quantile of {stored['n_images']} "
        f"training images' reconstruction errors: {stored['threshold']:.5f}, relative "
        f"{stored['relative_threshold']:.3f})"
    )
