"""Should the model answer? The out-of-distribution screen ``cxrcae predict`` runs on every input.

Three kinds of check, each with a reason a person can read in the row:

1. **DICOM header** (``cxrcae.io.dicom.header_facts``): a modality that is not a radiograph (CT, MR, US,
   ...; CR, DX and DR pass, as do the generic OT/SC wrappers, left to the content checks) or a body part
   that is not the chest **refuses** the file: status "refused", no class. A lateral or oblique view is
   **flagged**: the classifier learned frontal views only.
2. **Cheap content checks** where a reconstruction error alone is not reliable: an autoencoder reconstructs
   a blank page almost perfectly, and judges a photograph by its gray levels only. A strongly coloured
   image (colourfulness above ``COLOR_MAX``; radiographs score 0-5, photographs 30-110) or a near-constant
   one (gray standard deviation below ``MIN_STD``; the shared X-rays all have >= 0.05) is flagged.
3. **Reconstruction error** of the guard autoencoder stored with the model (``cxrcae.ood.guard``), in
   absolute terms and relative to the image's own contrast: above either threshold fitted on training
   X-rays the image is flagged. ``score`` is the larger of the two scores over their thresholds, so 1.0 is
   the line and 3 means three times what a training X-ray may have.

A flagged row keeps its probabilities and ``top_class`` but its label becomes "uncertain"; ``--no-ood``
turns the screen off.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cxrcae.errors import CheckpointError
from cxrcae.hub.resolve import resolve_checkpoint
from cxrcae.io.facts import ImageFacts
from cxrcae.models.checkpoint import GUARD_NAME
from cxrcae.ood.guard import Guard, guard_block, has_guard, load_guard

UNCERTAIN = "uncertain"
REFUSED = "refused"
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
GENERIC_MODALITIES = ("OT", "SC")  # "other" / secondary capture: says nothing about what was imaged
CHEST_WORDS = ("CHEST", "THORAX", "THORAC", "LUNG", "TORAX")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT", "LATERO-LATERAL")
OBLIQUE_VIEWS = ("RAO", "LAO", "RPO", "LPO", "RLO", "LLO", "OBLIQUE")
COLOR_MAX = 20.0
MIN_STD = 0.02


@dataclass
class Verdict:
    """The screen's answer for one image: ``refused`` (no class), ``flagged`` (label "uncertain")."""

    refused: bool = False
    flagged: bool = False
    score: float | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def out_of_distribution(self) -> bool:
        return self.refused or self.flagged

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def apply(self, row: Any) -> Any:
        """Write the verdict into a prediction row (``cxrcae.infer.prediction.Prediction``)."""
        row.out_of_distribution = self.out_of_distribution
        row.ood_score = self.score
        row.ood_reason = self.reason
        if self.refused:
            row.status, row.reason, row.label, row.probability = REFUSED, self.reason, None, None
            row.top_class, row.probabilities, row.top_k = None, {}, []
        elif self.flagged:
            row.label = UNCERTAIN
        return row


def header_check(header: dict[str, str]) -> tuple[list[str], list[str]]:
    """(reasons to refuse, reasons to flag) from a DICOM file's header facts."""
    refuse, flag = [], []
    modality = header.get("modality", "")
    if modality and modality not in RADIOGRAPH_MODALITIES + GENERIC_MODALITIES:
        refuse.append(f"DICOM modality {modality} is not a radiograph (CR/DX/DR)")
    part = header.get("body_part", "")
    if part and not any(word in part for word in CHEST_WORDS):
        refuse.append(f"DICOM body part {part} is not the chest")
    for key, tag in (("view_position", "ViewPosition"), ("view", "ViewCode")):
        value = header.get(key, "")
        if not value or "DECUBITUS" in value:  # lateral decubitus is a frontal projection
            continue
        if value in LATERAL_VIEWS or "LATERAL" in value:
            flag.append(f"lateral view ({tag} {value}); the model was trained on frontal views")
            break
        if value in OBLIQUE_VIEWS or "OBLIQUE" in value:
            flag.append(f"oblique view ({tag} {value}); the model was trained on frontal views")
            break
    return refuse, flag


def content_check(facts: ImageFacts) -> list[str]:
    """Reasons to flag from what decoding saw (colour, gray spread)."""
    reasons = []
    if facts.colorfulness > COLOR_MAX:
        reasons.append(
            f"strongly coloured image (colourfulness {facts.colorfulness:.0f} > {COLOR_MAX:.0f}); "
            "radiographs are gray"
        )
    if facts.gray_std < MIN_STD:
        reasons.append(f"blank or near-constant image (gray std {facts.gray_std:.3f} < {MIN_STD})")
    return reasons


class Screen:
    """The checks for one model: ``check(images, facts)`` -> one ``Verdict`` per image of a batch."""

    def __init__(self, guard: Guard | None, image_size: int, resize_mode: str):
        if guard is not None:
            fitted = (int(guard.block["image_size"]), str(guard.block["resize_mode"]))
            if fitted != (int(image_size), str(resize_mode)):
                raise CheckpointError(
                    f"the OOD guard was fitted at {fitted[0]} px ({fitted[1]}) but the model reads "
                    f"{image_size} px ({resize_mode}); re-fit it with `cxrcae calibrate-ood`"
                )
        self.guard = guard

    @classmethod
    def for_model(cls, model: Any, config: dict[str, Any], device: torch.device) -> Screen:
        """The screen of a checkpoint folder / Hub id (its guard if it has one); header and content checks
        only for an in-memory model."""
        guard = None
        if not isinstance(model, nn.Module):
            folder = resolve_checkpoint(model)
            if guard_block(config) is not None and not has_guard(folder, config):
                # e.g. a copy that kept config.json only (Hub push/pull move model files): screen without it
                warnings.warn(
                    f"{folder}: config.json describes an OOD guard but {GUARD_NAME} is missing; only the "
                    "header and content checks run (re-fit it with `cxrcae calibrate-ood`)",
                    stacklevel=2,
                )
            else:
                guard = load_guard(folder, config, device)
        return cls(guard, int(config["image_size"]), str(config.get("resize_mode", "stretch")))

    def check(self, images: torch.Tensor, facts: Sequence[ImageFacts]) -> list[Verdict]:
        ratios = self.guard.ratios(images) if self.guard is not None else None
        verdicts = []
        for i, fact in enumerate(facts):
            refuse, flag = header_check(fact.header)
            flag += content_check(fact)
            score = None
            if ratios is not None:
                absolute, relative = (float(r) for r in ratios[i])
                score = max(absolute, relative) if relative == relative else absolute  # NaN: no threshold
                if absolute > 1.0:
                    flag.append(f"reconstruction error {absolute:.1f}x the guard's limit")
                if relative > 1.0:
                    flag.append(f"reconstruction error for its contrast {relative:.1f}x the guard's limit")
            verdicts.append(Verdict(bool(refuse), bool(flag) and not refuse, score, refuse + flag))
        return verdicts
