"""Fit the out-of-distribution guard of a classifier: an autoencoder of its own and a score threshold.

The guard (``cxrcae.models.guard``) needs an autoencoder that reconstructs chest X-rays well:

- the pretraining run the classifier was fine-tuned from, when its folder is still there (encoder and
  decoder as trained; nothing to train);
- otherwise a pretrained encoder without its decoder (``--autoencoder ENCODER``, the folder in the
  classifier's ``encoder_init``, or the bundled encoder it was extracted from, matched by weights sha256),
  frozen, with a decoder trained on it for a few epochs from cached encoder features (the same loss as
  pretraining); the images are split so that the threshold comes from images the decoder never saw;
- failing both, the classifier's own fine-tuned encoder, frozen, with a trained decoder (said in a note).

``--autoencoder`` may also name another classifier folder that has a guard: its guard autoencoder is reused
as is (only the thresholds are fitted, for this model's preprocessing), which takes seconds.

The threshold is the ``quantile`` (default 99.5%) of the reconstruction errors of training X-rays under the
classifier's preprocessing, so about 0.5% of images like the training ones are flagged by construction.
Test images are never used: rows of a ``test`` split, and every file listed in the model's
``test_split.csv`` (the bundled model ships one), are left out.

``calibrate_ood`` adds or re-fits the guard of an existing model (``cxrcae calibrate-ood``);
``guard_after_finetune`` writes it at the end of fine-tuning from a CAE pretraining folder.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrcae import bundled
from cxrcae.data import dataset_fingerprint, load_records
from cxrcae.data.records import Record
from cxrcae.data.stream import iter_batches
from cxrcae.errors import CheckpointError, CxrcaeError, DataError
from cxrcae.hub.resolve import (
    encoder_state,
    in_hub_cache,
    load_checkpoint,
    resolve_checkpoint,
    resolve_encoder_checkpoint,
)
from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.models.checkpoint import load_state_strict, read_config
from cxrcae.models.guard import load_guard, reconstruction_scores, save_guard
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import reproducible, resolve_device

DEFAULT_QUANTILE = 0.995
DEFAULT_EPOCHS = 5
DEFAULT_MAX_IMAGES = 5000  # a 99.5% quantile is well estimated from ~1,000 held-out scores; more costs time
HOLDOUT = 0.2  # share of the images kept from decoder training to set the threshold on
MIN_SCORED = 20
TEST_LIST = "test_split.csv"
LR = 1e-3


# ----------------------------------------------------------------------------------------------- core


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

    _check_settings(epochs, quantile, max_images)
    start = time.perf_counter()
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
    dev = resolve_device(device)
    if reuse_guard:
        cae, has_decoder, source = _current_guard(folder, config, data_info)
    else:
        cae, has_decoder, source = guard_autoencoder(config, folder, autoencoder)
    size, mode = int(config["image_size"]), str(config.get("resize_mode", "stretch"))
    paths = [str(r.path) for r in records]
    notes = list(source.pop("notes", []))
    training = None
    with reproducible(seed):
        if has_decoder:
            scored = paths
        else:
            scored, fit_paths = _hold_out(paths, seed, data)
        if not has_decoder and not reuse_guard:
            training = train_decoder(
                cae,
                fit_paths,
                size,
                mode,
                epochs=epochs,
                batch_size=batch_size,
                num_workers=num_workers,
                device=dev,
                progress=progress,
            )
        cae = as_stored(cae)
        scores, errors = score_paths(cae, scored, size, mode, batch_size, num_workers, dev, progress)
    if len(scores) < MIN_SCORED:
        raise DataError(f"{data}: only {len(scores)} readable image(s) to set the threshold on")
    if errors:
        notes.append(f"{len(errors)} unreadable image(s) left out")
    block = threshold_block(scores, quantile, size, mode)
    block["autoencoder"] = {
        "decoder": "trained on the frozen encoder" if training else "as trained",
        **source,
    }
    if training:
        block["autoencoder"]["decoder_training"] = training
    held_out = not has_decoder
    block["data"] = {**data_info, "scored_images": len(scores), "held_out_from_decoder": held_out}
    block["fitted_by"] = "calibrate-ood" + (" --reuse-guard" if reuse_guard else "")
    stored = save_guard(folder, cae, block)
    return {
        "config": str(folder / "config.json"),
        "file": str(folder / stored["file"]),
        "threshold": stored["threshold"],
        "relative_threshold": stored["relative_threshold"],
        "quantile": quantile,
        "n_images": stored["n_images"],
        "distribution": stored["distribution"],
        "decoder_trained": training is not None,
        "decoder_training": training,
        "autoencoder": stored["autoencoder"],
        "data": stored["data"],
        "seconds": round(time.perf_counter() - start, 1),
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
    chosen = _subsample([r for r in records], max_images, seed)
    paths = [str(r.path) for r in chosen]
    cae = as_stored(cae)
    with reproducible(seed):
        scores, _ = score_paths(cae, paths, image_size, resize_mode, batch_size, 0, device, progress)
    if len(scores) < MIN_SCORED:
        return f"no OOD guard written: only {len(scores)} readable training image(s); {hint}"
    block = threshold_block(scores, DEFAULT_QUANTILE, image_size, resize_mode)
    block["autoencoder"] = {**_provenance(info.get("ref"), config), "decoder": "as trained"}
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


# ----------------------------------------------------------------------------------------------- pieces


def _hold_out(paths: list[str], seed: int, data: Any) -> tuple[list[str], list[str]]:
    """(images to set the thresholds on, images to train the decoder on): a seeded 20 / 80 split."""
    order = np.random.default_rng(seed).permutation(len(paths))
    n_hold = max(MIN_SCORED, int(round(HOLDOUT * len(paths))))
    if len(paths) - n_hold < MIN_SCORED:
        raise DataError(
            f"{data}: {len(paths)} image(s) are too few to train the guard's decoder and hold some out for "
            f"its threshold; give at least {2 * MIN_SCORED}"
        )
    return [paths[i] for i in sorted(order[:n_hold])], [paths[i] for i in sorted(order[n_hold:])]


def _current_guard(
    folder: Path, config: dict[str, Any], data_info: dict[str, Any]
) -> tuple[ConvAutoencoder, bool, dict[str, Any]]:
    """The model's guard autoencoder for ``reuse_guard``: (autoencoder, whether its decoder saw every image
    of its fit, provenance carried over)."""
    guard = load_guard(folder, config)
    if guard is None:
        raise CheckpointError(f"{folder}: no OOD guard to reuse; fit one without --reuse-guard")
    previous = guard.block
    source = dict(previous.get("autoencoder") or {})  # "decoder" and its training carried over as they were
    held_out = bool((previous.get("data") or {}).get("held_out_from_decoder"))
    if held_out and (previous.get("data") or {}).get("fingerprint") != data_info["fingerprint"]:
        source["notes"] = [
            "the images differ from those of the fit that trained the decoder (fingerprint), so some images "
            "the thresholds come from may be ones the decoder learned from; use the same DATA, --max-images "
            "and --seed"
        ]
    return guard.cae, not held_out, source


def fit_records(
    data: str | Path, folder: Path, split: str | None, max_images: int | None, seed: int
) -> tuple[list[Record], dict[str, Any]]:
    """The images to fit on: ``split`` rows of a splits CSV (every row of a manifest or folder without a
    split column), never a test row nor a file of the model's ``test_split.csv``; subsampled, seeded."""

    records = load_records(data, labeled=False)
    splits = sorted({r.split for r in records if r.split is not None})
    excluded = 0
    if splits:
        if split is not None and split not in splits:
            raise DataError(f"{data}: no '{split}' rows (splits found: {', '.join(splits)})")
        keep = [r for r in records if r.split != "test" and (split is None or r.split == split)]
        excluded += sum(r.split == "test" for r in records)
        records = keep
    listed = _test_list(folder)
    if listed:
        keep = [r for r in records if not _listed(r.path, listed)]
        excluded += len(records) - len(keep)
        records = keep
    if not records:
        raise DataError(f"{data}: no images left to fit the OOD guard on (test images are never used)")
    chosen = _subsample(records, max_images, seed)
    return chosen, {
        "source": str(data),
        "split": split if splits else None,
        "images": len(chosen),
        "available_images": len(records),
        "excluded_test_images": excluded,
        "fingerprint": dataset_fingerprint(chosen),
    }


def guard_autoencoder(
    config: dict[str, Any], folder: Path, ref: str | Path | None
) -> tuple[ConvAutoencoder, bool, dict[str, Any]]:
    """(autoencoder, whether its decoder is trained, provenance) for the guard (module docstring order)."""

    if ref is not None:
        found = _autoencoder_from(ref)
        if found is None:
            raise CheckpointError(f"{ref}: not an autoencoder, encoder or classifier checkpoint folder")
        return found
    init = config.get("encoder_init") or {}
    for candidate in (init.get("resolved"), init.get("ref")):
        if candidate and Path(candidate).expanduser().is_dir():
            found = _autoencoder_from(candidate, expect_sha=init.get("weights_sha256"))
            if found is not None:
                return found
    shipped = bundled.bundled_encoder()
    if shipped is not None and init.get("weights_sha256"):
        shipped_cfg = read_config(shipped)
        if (shipped_cfg.get("extracted_from") or {}).get("weights_sha256") == init["weights_sha256"]:
            found = _autoencoder_from(shipped)
            if found is not None:
                return found
    state, _ = encoder_state(folder)
    cae = ConvAutoencoder(
        CAEEncoder(int(config.get("in_chans", 3))), CAEDecoder(int(config.get("in_chans", 3)))
    )
    load_state_strict(cae.encoder, state, f"{folder} (encoder)")
    source = _provenance(str(folder), config)
    source["encoder"] = "the classifier's own fine-tuned encoder"
    source["notes"] = [
        "no pretrained encoder found (encoder_init folder gone or none); the guard's decoder is trained on "
        "the classifier's own fine-tuned encoder; pass --autoencoder CAE_OR_ENCODER to use a pretrained one"
    ]
    return cae, False, source


def _autoencoder_from(
    ref: str | Path, expect_sha: str | None = None
) -> tuple[ConvAutoencoder, bool, dict[str, Any]] | None:
    folder = resolve_encoder_checkpoint(ref)  # "bundled": the shipped encoder
    config = read_config(folder)
    kind = config.get("kind")
    if expect_sha and config.get("weights_sha256") != expect_sha:
        return None  # the folder was re-trained since: not the encoder the classifier started from
    if kind == "autoencoder":
        cae, config = load_checkpoint(folder, "cpu")
        return cae, True, _provenance(str(ref), config)
    if kind not in ("encoder", "classifier"):
        return None
    guard = load_guard(folder, config) if kind == "classifier" else None
    if guard is not None:  # another classifier's guard: its autoencoder, decoder and all
        source = {**_provenance(str(ref), config), "kind": "ood guard of a classifier"}
        source["weights_sha256"] = guard.block.get("weights_sha256")
        return guard.cae, True, source
    state, config = encoder_state(folder)
    in_chans = int(config.get("in_chans", 3))
    cae = ConvAutoencoder(CAEEncoder(in_chans), CAEDecoder(in_chans))
    load_state_strict(cae.encoder, state, f"{ref} (encoder)")
    return cae, False, _provenance(str(ref), config)


def _provenance(ref: Any, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "ref": str(ref),
        "kind": config.get("kind"),
        "weights_sha256": config.get("weights_sha256"),
        "image_size": config.get("image_size"),
        "resize_mode": config.get("resize_mode"),
    }


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
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Train ``cae.decoder`` (fresh weights) on the frozen ``cae.encoder`` with the pretraining MSE.

    The encoder runs once per image (features cached as float16 in memory, with the gray target): each
    epoch then costs only the decoder. Returns the per-epoch training MSE."""

    cae.encoder.to(device).eval().requires_grad_(False)
    feats, targets, done = [], [], 0
    for batch in iter_batches(paths, size, mode, batch_size=batch_size, num_workers=num_workers):
        if batch.indices:
            with torch.inference_mode():
                z = cae.encoder(batch.images.to(device))
            feats.append(z.to("cpu", torch.float16))
            targets.append(batch.images[:, :1].to(torch.float16))
        done += len(batch)
        progress("guard: encoding", done, len(paths))
    if not feats:
        raise DataError("none of the images to train the guard's decoder on could be read")
    z_all, x_all = torch.cat(feats), torch.cat(targets)
    n = len(z_all)
    decoder = CAEDecoder(cae.decoder.stages[-1].out_channels).to(device).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=LR)
    history = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            z = z_all[idx].to(device, torch.float32)
            x = x_all[idx].to(device, torch.float32)
            recon = decoder(z)
            loss = nn.functional.mse_loss(recon, x.expand_as(recon))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            progress(f"guard: decoder epoch {epoch}/{epochs}", seen, n, f"mse {total / seen:.5f}")
        history.append(total / max(seen, 1))
    cae.decoder = decoder.eval()
    cae.requires_grad_(False)
    return {"images": n, "epochs": epochs, "lr": LR, "batch_size": batch_size, "train_mse": history}


def score_paths(
    cae: ConvAutoencoder,
    paths: Sequence[str],
    size: int,
    mode: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: ProgressFn = no_progress,
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """``reconstruction_scores`` (n_ok, 2) of the readable ``paths`` (float32 weights) and the unreadable."""
    cae = cae.float().to(device).eval()
    scores, errors, done = [], [], 0
    for batch in iter_batches(paths, size, mode, batch_size=batch_size, num_workers=num_workers):
        errors += batch.errors
        if batch.indices:
            with torch.inference_mode():
                scores.append(reconstruction_scores(cae, batch.images.to(device)).cpu().numpy())
        done += len(batch)
        progress("guard: scoring", done, len(paths))
    return (np.concatenate(scores) if scores else np.zeros((0, 2), np.float32)), errors


def as_stored(cae: ConvAutoencoder) -> ConvAutoencoder:
    """The autoencoder with its weights rounded to float16 as ``ood.safetensors`` stores them, so that the
    thresholds are set on exactly the scores prediction will compute."""
    return cae.to(torch.float16).to(torch.float32)


def threshold_block(scores: np.ndarray, quantile: float, size: int, mode: str) -> dict[str, Any]:
    """The ``ood`` config fields that in-distribution scores (n, 2) give: both thresholds and a summary."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, 2)
    thresholds = np.quantile(scores, quantile, axis=0)
    flagged = (scores > thresholds).any(axis=1)

    def summary(values: np.ndarray) -> dict[str, float]:
        return {
            "mean": float(values.mean()),
            **{f"p{q}": float(np.quantile(values, q / 100)) for q in (50, 90, 99)},
            "max": float(values.max()),
        }

    return {
        "threshold": float(thresholds[0]),
        "relative_threshold": float(thresholds[1]),
        "quantile": float(quantile),
        "n_images": int(len(scores)),
        "image_size": int(size),
        "resize_mode": str(mode),
        "distribution": {
            "mse": summary(scores[:, 0]),
            "relative": summary(scores[:, 1]),
            "flagged_fraction": float(flagged.mean()),
        },
    }


def _check_settings(epochs: int, quantile: float, max_images: int | None) -> None:
    if int(epochs) < 1:
        raise CxrcaeError(f"decoder epochs must be at least 1, got {epochs}")
    if not 0.5 <= float(quantile) < 1.0:
        raise CxrcaeError(f"the threshold quantile must be in [0.5, 1), got {quantile}")
    if max_images is not None and int(max_images) < 2 * MIN_SCORED:
        raise CxrcaeError(f"max images must be at least {2 * MIN_SCORED}, got {max_images}")


def _subsample(records: Sequence[Record], max_images: int | None, seed: int) -> list[Record]:
    ordered = sorted(records, key=lambda r: str(r.path))
    if max_images is None or len(ordered) <= int(max_images):
        return ordered
    keep = np.random.default_rng(seed).choice(len(ordered), int(max_images), replace=False)
    return [ordered[i] for i in sorted(keep)]


def _test_list(folder: Path) -> set[str]:
    """Paths (relative, forward slashes) in the model's ``test_split.csv``; empty when it has none."""
    path = folder / TEST_LIST
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        return {r["path"].replace("\\", "/").removeprefix("./") for r in rows if r.get("path")}


def _listed(path: Path, listed: set[str]) -> bool:
    """Whether ``path`` ends with one of the relative paths in ``listed`` (whole components only)."""
    parts = Path(path).parts
    return any("/".join(parts[-k:]) in listed for k in range(1, len(parts) + 1))
