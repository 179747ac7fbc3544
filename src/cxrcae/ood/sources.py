"""Where a guard's autoencoder comes from, in order of preference.

- the pretraining run the classifier was fine-tuned from, when its folder is still there (encoder and
  decoder as trained; nothing to train);
- otherwise a pretrained encoder without its decoder (``--autoencoder ENCODER``, the folder in the
  classifier's ``encoder_init``, or the bundled encoder it was extracted from, matched by weights sha256),
  frozen, with a decoder to train on it (``cxrcae.ood.decoder``);
- failing both, the classifier's own fine-tuned encoder, frozen, with a decoder to train (said in a note).

``--autoencoder`` may also name another classifier folder that has a guard: its guard autoencoder is reused
as is (only the thresholds are fitted, for this model's preprocessing), which takes seconds.

Each source comes back as (autoencoder, whether its decoder is trained, provenance for the ``ood`` block);
a provenance may carry ``notes`` for the user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrcae import bundled
from cxrcae.errors import CheckpointError
from cxrcae.hub.resolve import encoder_state, load_checkpoint, resolve_encoder_checkpoint
from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.models.checkpoint import load_state_strict, read_config
from cxrcae.ood.guard import load_guard

Source = tuple[ConvAutoencoder, bool, dict[str, Any]]


def guard_autoencoder(config: dict[str, Any], folder: Path, ref: str | Path | None) -> Source:
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
    in_chans = int(config.get("in_chans", 3))
    cae = ConvAutoencoder(CAEEncoder(in_chans), CAEDecoder(in_chans))
    load_state_strict(cae.encoder, state, f"{folder} (encoder)")
    source = provenance(str(folder), config)
    source["encoder"] = "the classifier's own fine-tuned encoder"
    source["notes"] = [
        "no pretrained encoder found (encoder_init folder gone or none); the guard's decoder is trained on "
        "the classifier's own fine-tuned encoder; pass --autoencoder CAE_OR_ENCODER to use a pretrained one"
    ]
    return cae, False, source


def current_guard(folder: Path, config: dict[str, Any], data_info: dict[str, Any]) -> Source:
    """The model's guard autoencoder, to re-fit only its thresholds: (autoencoder, whether its decoder saw
    every image of its fit, provenance carried over)."""
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


def provenance(ref: Any, config: dict[str, Any]) -> dict[str, Any]:
    """What the ``ood`` block records about the checkpoint an autoencoder came from."""
    return {
        "ref": str(ref),
        "kind": config.get("kind"),
        "weights_sha256": config.get("weights_sha256"),
        "image_size": config.get("image_size"),
        "resize_mode": config.get("resize_mode"),
    }


def _autoencoder_from(ref: str | Path, expect_sha: str | None = None) -> Source | None:
    folder = resolve_encoder_checkpoint(ref)  # "bundled": the shipped encoder
    config = read_config(folder)
    kind = config.get("kind")
    if expect_sha and config.get("weights_sha256") != expect_sha:
        return None  # the folder was re-trained since: not the encoder the classifier started from
    if kind == "autoencoder":
        cae, config = load_checkpoint(folder, "cpu")
        return cae, True, provenance(str(ref), config)
    if kind not in ("encoder", "classifier"):
        return None
    guard = load_guard(folder, config) if kind == "classifier" else None
    if guard is not None:  # another classifier's guard: its autoencoder, decoder and all
        source = {**provenance(str(ref), config), "kind": "ood guard of a classifier"}
        source["weights_sha256"] = guard.block.get("weights_sha256")
        return guard.cae, True, source
    state, config = encoder_state(folder)
    in_chans = int(config.get("in_chans", 3))
    cae = ConvAutoencoder(CAEEncoder(in_chans), CAEDecoder(in_chans))
    load_state_strict(cae.encoder, state, f"{ref} (encoder)")
    return cae, False, provenance(str(ref), config)
