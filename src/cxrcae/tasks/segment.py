"""``segment``: one mask per anatomical structure (lungs, heart, clavicles, ...), a U-Net on the encoder.

Model: ``cxrcae.models.unet.CXRSegmenter`` (the CAE encoder, its pre-pool activations as skips, a U-Net
decoder), one logit map per structure. Loss: binary cross-entropy plus soft Dice (1 - mean Dice of the
sigmoid maps per image and structure), equally weighted. Probabilities: the per-pixel sigmoid; a pixel is in
a structure's mask at probability >= 0.5. Validation: Dice per structure (mean over images) and its mean
over structures (``val_mean_dice``, shown in the progress line).

Data: a manifest with one mask-path column per structure (``--masks left_lung,right_lung,heart``; without
``--masks``, every column holding image paths), or a folder of ``images/`` + ``masks/<structure>/``
(``cxrcae.data.records``); masks are read and resized by ``cxrcae.data.masks``.

Evaluation (``cxrcae evaluate``): Dice, IoU and 95% Hausdorff distance per structure with patient-bootstrap
CIs (``cxrcae.tasks.segment_metrics``, where empty masks are defined), in metrics.json under the structure
names, and overlays of the worst and best images. Prediction (``cxrcae predict``): per structure its area
(fraction of the model input and pixels at the model's size) and a mask PNG, an overlay PNG, and with
``left_lung``, ``right_lung`` and ``heart`` the cardiothoracic ratio.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cxrcae.data.masks import check_masks, load_masks, mask_columns, restore_mask
from cxrcae.data.records import Record
from cxrcae.errors import CheckpointError, CxrcaeError, DataError
from cxrcae.io import load_for_model
from cxrcae.io.decoded import DecodedCache
from cxrcae.models.cae import CAEEncoder
from cxrcae.models.unet import DECODER_CHANNELS, CXRSegmenter, UNetDecoder
from cxrcae.tasks.base import (
    EpochOutputs,
    Objective,
    TargetSource,
    Task,
    Transform,
    _numpy,
    check_class_names,
)
from cxrcae.tasks.segment_files import gray_image, mask_png, overlay, png_bytes, write_png
from cxrcae.tasks.segment_metrics import FIGURES, cardiothoracic_ratio, dice, per_image, summarise

MAX_STRUCTURES = 64
THRESHOLD = 0.5
CTR_STRUCTURES = ("heart", "left_lung", "right_lung")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Structure names become file names (``NAME_heart.png``) and metrics.json keys."""
RESERVED = frozenset({"structures", "mean", "bootstrap", "images", "threshold", "hd95_unit", "empty_masks"})
"""metrics.json keys beside the structures', which no structure may take."""
EMPTY_MASKS = "both empty: Dice 1, IoU 1, HD95 0; one empty: Dice 0, IoU 0, HD95 = the image diagonal"
EXAMPLES = 3
"""Worst and best images drawn by ``evaluation_files``."""


def soft_dice_bce(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE on the logits plus 1 - soft Dice of their sigmoid, per image and structure, averaged (fp32)."""
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    p = torch.sigmoid(logits)
    inter = (p * targets).sum(dim=(2, 3))
    total = p.sum(dim=(2, 3)) + targets.sum(dim=(2, 3))
    return bce + (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()


def hard_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, K) Dice of the thresholded masks (logit > 0 is probability > 0.5); 1 where both are empty."""
    pred, ref = logits > 0, targets > 0
    inter = (pred & ref).sum(dim=(2, 3)).double()
    total = pred.sum(dim=(2, 3)).double() + ref.sum(dim=(2, 3)).double()
    return torch.where(total > 0, 2.0 * inter / total.clamp(min=1), torch.ones_like(total))


class Segmentation(Objective):
    """Dice + BCE on per-structure logit maps; validation Dice per structure and its mean."""

    name = "dice_bce"

    def __init__(self, structures: Sequence[str]):
        self.structures = list(structures)
        self.monitor_metrics = ("val_mean_dice", *(f"val_dice_{s}" for s in self.structures))
        self._dice: list[np.ndarray] = []

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        logits = model(images)
        return soft_dice_bce(logits, targets), logits

    def start_validation(self) -> None:
        self._dice = []

    def observe(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self._dice.append(hard_dice(outputs, targets).cpu().numpy())

    def epoch_metrics(self, stats: EpochOutputs) -> dict[str, Any]:
        if not self._dice:
            return {}
        per_structure = np.concatenate(self._dice).mean(axis=0)
        return {
            "val_mean_dice": float(per_structure.mean()),
            **{f"val_dice_{s}": float(v) for s, v in zip(self.structures, per_structure, strict=True)},
        }


class MaskDataset(Dataset):
    """Items ``{"image": (3,S,S) float32, "label": (K,S,S) uint8 0/1, "path", "patient_id"}``.

    Every mask file is checked when the dataset is made (``cxrcae.data.masks.check_masks``), so a missing or
    misshapen mask stops a run before its first step. A torchvision v2 ``transform`` (``--augment``) moves
    image and masks together (masks as ``tv_tensors.Mask``: nearest, never blurred; photometric changes
    leave them alone); any other callable sees the image only.
    """

    def __init__(
        self,
        records: Sequence[Record],
        structures: Sequence[str],
        image_size: int,
        resize_mode: str = "stretch",
        transform: Transform | None = None,
        decoded: DecodedCache | None = None,
        where: str | Path = "data",
    ):
        self.records = list(records)
        self.structures = list(structures)
        self.image_size, self.resize_mode = int(image_size), resize_mode
        self.transform, self.decoded = transform, decoded
        check_masks(self.records, self.structures, where)

    def __len__(self) -> int:
        return len(self.records)

    def path(self, index: int) -> str:
        return str(self.records[index].path)

    def masks(self, index: int) -> np.ndarray:
        return load_masks(self.records[index], self.structures, self.image_size, self.resize_mode)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if self.decoded is not None:
            array = self.decoded.load(record.path, self.image_size, self.resize_mode)
        else:
            array = load_for_model(record.path, self.image_size, mode=self.resize_mode)
        image, masks = torch.from_numpy(array), torch.from_numpy(self.masks(index))
        if isinstance(self.transform, v2.Transform):
            image, moved = self.transform(image, tv_tensors.Mask(masks))
            masks = torch.as_tensor(moved).as_subclass(torch.Tensor)
        elif self.transform is not None:
            image = self.transform(image)
        patient = record.patient_id or ""
        return {"image": image, "label": masks, "path": self.path(index), "patient_id": patient}


class Segment(Task):
    name = "segment"
    kind = "segmenter"
    output_key = "structures"
    description = "per-pixel segmentation of anatomical structures, one mask each"
    metric_names = ("val_mean_dice",)

    def example(self, image_size: int = 32) -> tuple[dict[str, Any], torch.Tensor]:
        config = {"task": self.name, "kind": self.kind, "head": "unet", "image_size": image_size}
        masks = torch.zeros(2, 2, image_size, image_size)
        masks[:, 0, 4:20, 4:14], masks[:, 1, 8:24, 16:28] = 1, 1
        return {**config, "structures": ["left_lung", "heart"]}, masks

    def build(self, config: dict[str, Any]) -> nn.Module:
        structures = config.get("structures") or []
        if not structures:
            raise CheckpointError("segmenter config.json needs at least one structure")
        channels = config.get("decoder_channels") or DECODER_CHANNELS
        decoder = UNetDecoder(len(structures), channels)
        return CXRSegmenter(CAEEncoder(int(config.get("in_chans", 3))), decoder)

    def validate_config(self, config: dict[str, Any], where: str | Path) -> None:
        if "image_size" not in config:
            raise CheckpointError(f"{where}: missing field 'image_size'")
        names = check_class_names(config, where, "structures", 1, MAX_STRUCTURES)
        bad = [n for n in names if not NAME_PATTERN.fullmatch(n) or n in RESERVED]
        if bad:
            raise CheckpointError(
                f"{where}: field 'structures' has {bad[0]!r}: a structure name is letters, digits, '_', '.' "
                f"or '-' (up to 64) and not one of {', '.join(sorted(RESERVED))}"
            )
        channels = config.get("decoder_channels")
        if channels is not None and not (
            isinstance(channels, list)
            and len(channels) == len(DECODER_CHANNELS)
            and all(type(c) is int and 1 <= c <= 4096 for c in channels)
        ):
            raise CheckpointError(
                f"{where}: field 'decoder_channels' must list {len(DECODER_CHANNELS)} whole numbers "
                f"from 1 to 4096, got {channels!r}"
            )
        threshold = config.get("mask_threshold", THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise CheckpointError(
                f"{where}: field 'mask_threshold' must be a number in (0, 1), got {threshold!r}"
            )

    def objective(self, config: dict[str, Any], **_: Any) -> Objective:
        return Segmentation(config["structures"])

    def probabilities(self, outputs: torch.Tensor | np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """Per-pixel sigmoid: (N, K, S, S) float32 probabilities, one map per structure."""
        logits = _numpy(outputs).astype(np.float32, copy=False)
        return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # the sigmoid, without overflow

    def card_summary(self, config: dict[str, Any]) -> str:
        names = config.get("structures") or []
        return f"Segments {len(names)} structure(s) of an X-ray, one mask each: {', '.join(map(str, names))}."

    # ------------------------------------------------------------------------------ evaluation

    def targets(self, records: Sequence[Record], config: dict[str, Any]) -> np.ndarray:
        """(N, K, S, S) uint8 0/1 reference masks at the model's size, columns named by the structures."""
        structures = list(config["structures"])
        _require_columns(records, structures, "evaluation data")
        check_masks(records, structures, "evaluation data")
        size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
        out = np.zeros((len(records), len(structures), size, size), dtype=np.uint8)
        for i, record in enumerate(records):
            out[i] = load_masks(record, structures, size, mode)
        return out

    def score(
        self,
        probabilities: np.ndarray,
        targets: np.ndarray,
        groups: Sequence[str],
        config: dict[str, Any],
        *,
        n_boot: int = 1000,
        seed: int = 0,
    ) -> dict[str, Any]:
        """metrics.json: ``{structure: {"dice", "iou", "hd95", "ci", "reference_empty", "predicted_empty"}}``
        per structure, ``"mean"`` over structures, the bootstrap's settings and the definitions used."""
        structures = list(config["structures"])
        masks = _masks(probabilities, config)
        if masks.shape != np.shape(targets) or masks.ndim != 4 or masks.shape[1] != len(structures):
            raise DataError(
                f"predicted masks {masks.shape} and reference masks {np.shape(targets)} do not match "
                f"({len(structures)} structures)"
            )
        if not len(masks):
            raise DataError("no images to score")
        refs = np.asarray(targets, dtype=bool)
        report = summarise(per_image(masks, refs), structures, list(groups), n_boot=n_boot, seed=seed)
        for j, name in enumerate(structures):
            report[name]["reference_empty"] = int((~refs[:, j].any(axis=(1, 2))).sum())
            report[name]["predicted_empty"] = int((~masks[:, j].any(axis=(1, 2))).sum())
        size = int(config["image_size"])
        return {
            "structures": structures,
            "images": len(masks),
            **{name: report[name] for name in structures},
            "mean": report["mean"],
            "bootstrap": report["bootstrap"],
            "threshold": THRESHOLD,
            "hd95_unit": f"pixels at the model's {size} x {size} input",
            "empty_masks": EMPTY_MASKS,
        }

    def metric_rows(self, metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        """One row per structure and one for the mean: Dice, IoU, HD95 with [95% CI] (fits 80 columns)."""
        headers = ["structure", "Dice [95% CI]", "IoU [95% CI]", "HD95 px [95% CI]"]
        rows = []
        for name in [*metrics.get("structures", []), "mean"]:
            block = metrics.get(name)
            if isinstance(block, dict):
                ci = block.get("ci") or {}
                rows.append([name, *(_cell(block[f], ci.get(f), f) for f in FIGURES)])
        return headers, rows

    def evaluation_files(
        self,
        out_dir: Path,
        paths: Sequence[str],
        probabilities: np.ndarray,
        targets: np.ndarray,
        metrics: dict[str, Any],
        config: dict[str, Any],
    ) -> dict[str, Path]:
        """``overlays/worst_N.png`` and ``overlays/best_N.png``: the images with the lowest and highest mean
        Dice over structures (up to 3 each), prediction filled, reference outlined."""
        structures = list(config["structures"])
        masks, refs = _masks(probabilities, config), np.asarray(targets, dtype=bool)
        scores = np.array(
            [np.mean([dice(m, r) for m, r in zip(*pair, strict=True)]) for pair in zip(masks, refs)]
        )
        order = np.argsort(scores, kind="stable")
        shown = min(EXAMPLES, (len(order) + 1) // 2)
        picks = [("worst", order[:shown]), ("best", order[::-1][: min(shown, len(order) - shown)])]
        size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
        files: dict[str, Path] = {}
        for which, indices in picks:
            for rank, i in enumerate(indices, start=1):
                caption = f"{which} {rank}: {Path(paths[i]).name} - mean Dice {scores[i]:.3f}"
                picture = overlay(_background(paths[i], size, mode), masks[i], structures, refs[i], caption)
                path = Path(out_dir) / "overlays" / f"{which}_{rank}.png"
                write_png(path, png_bytes(picture))
                files[f"overlay_{which}_{rank}"] = path
        return files

    # ------------------------------------------------------------------------------ prediction

    def prediction_columns(self, config: dict[str, Any]) -> list[str]:
        """Per structure its area (fraction of the model input, pixels at the model's size), the
        cardiothoracic ratio when lungs and heart are segmented, then the files ``prediction_files``
        writes: a mask PNG per structure and the overlay."""
        structures = list(config["structures"])
        columns = [c for s in structures for c in (f"{s}_area_fraction", f"{s}_area_px")]
        if all(s in structures for s in CTR_STRUCTURES):
            columns.append("cardiothoracic_ratio")
        return [*columns, *(f"{s}_mask" for s in structures), "overlay"]

    def prediction_row(self, probabilities: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
        """Areas per structure and, with ``heart``, ``left_lung`` and ``right_lung``, the cardiothoracic
        ratio (``segment_metrics.cardiothoracic_ratio``; empty when the heart or the lungs are not found)."""
        structures = list(config["structures"])
        masks = _masks(probabilities, config)
        row: dict[str, Any] = {}
        for name, mask in zip(structures, masks, strict=True):
            pixels = int(mask.sum())
            row[f"{name}_area_fraction"] = round(pixels / mask.size, 6)
            row[f"{name}_area_px"] = pixels
        if all(s in structures for s in CTR_STRUCTURES):
            heart, left, right = (masks[structures.index(s)] for s in CTR_STRUCTURES)
            ratio = cardiothoracic_ratio(heart, left, right)
            row["cardiothoracic_ratio"] = None if ratio is None else round(ratio, 4)
        return row

    def prediction_files(
        self,
        out_dir: Path,
        name: str,
        image: np.ndarray,
        probabilities: np.ndarray,
        config: dict[str, Any],
    ) -> dict[str, str]:
        """``NAME_<structure>.png`` (0/255) per structure and ``NAME_overlay.png``, at the size of ``image``:
        the model input, or the original image (masks mapped back through the checkpoint's resize mode)."""
        structures = list(config["structures"])
        masks = _masks(probabilities, config)
        gray = gray_image(image)
        if gray.shape != masks.shape[-2:]:
            mode = config.get("resize_mode", "stretch")
            masks = np.stack([restore_mask(m, gray.shape, mode) for m in masks])
        out = Path(out_dir)
        files = {
            f"{s}_mask": write_png(out / f"{name}_{s}.png", mask_png(m))
            for s, m in zip(structures, masks, strict=True)
        }
        files["overlay"] = write_png(out / f"{name}_overlay.png", png_bytes(overlay(gray, masks, structures)))
        return files

    # ------------------------------------------------------------------------------ fine-tuning on labels

    def target_fields(
        self, train: Sequence[Record], val: Sequence[Record], source: TargetSource, where: str
    ) -> dict[str, Any]:
        """``structures`` (``--masks``, or every column of image paths), the decoder's shape, ``head``
        ``unet``; one-line errors for options of other tasks, bad names and absent columns."""
        if source.labels or source.label_columns:
            raise DataError(
                "--labels / --label-columns do not apply to task 'segment'; "
                "name the mask columns with --masks"
            )
        structures = list(source.masks) or mask_columns(train)
        if not structures:
            raise DataError(
                f"{where}: no mask columns; name them with --masks (e.g. --masks left_lung,right_lung,heart) "
                "or use a folder of images/ and masks/<structure>/"
            )
        config = {"structures": structures, "decoder_channels": list(DECODER_CHANNELS)}
        try:
            self.validate_config({"image_size": 0, **config}, where)
        except CheckpointError as exc:
            raise DataError(str(exc).replace("field 'structures'", "--masks")) from None
        _require_columns([*train, *val], structures, where)
        return {**config, "head": "unet", "mask_threshold": THRESHOLD}

    def dataset(
        self,
        records: Sequence[Record],
        config: dict[str, Any],
        transform: Transform | None = None,
        decoded: DecodedCache | None = None,
    ) -> MaskDataset:
        size, mode = int(config["image_size"]), config.get("resize_mode", "stretch")
        return MaskDataset(records, config["structures"], size, mode, transform, decoded)


def _require_columns(records: Sequence[Record], structures: Sequence[str], where: str | Path) -> None:
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r.extra))
    absent = [s for s in structures if s not in columns]
    if absent:
        found = ", ".join(columns) or "none"
        raise DataError(f"{where}: no mask column {absent[0]!r} (columns beyond path/label: {found})")


def _masks(probabilities: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    return np.asarray(probabilities) >= float(config.get("mask_threshold", THRESHOLD))


def _cell(value: float, ci: Sequence[float] | None, figure: str) -> str:
    """``0.962 [.951,.970]`` (Dice, IoU) or ``12.3 [10.1,15.2]`` (HD95, pixels)."""
    if figure == "hd95":
        text, fmt = f"{value:.1f}", "{:.1f}"
    else:
        text, fmt = f"{value:.3f}", "{:.3f}"
    if not ci:
        return text
    lo, hi = (fmt.format(v) for v in ci)
    if figure != "hd95":
        lo, hi = lo.removeprefix("0"), hi.removeprefix("0")
    return f"{text} [{lo},{hi}]"


def _background(path: str, size: int, mode: str) -> np.ndarray:
    """The image as the model saw it, or black when it can no longer be read."""
    try:
        return load_for_model(path, size, mode)[0]
    except (CxrcaeError, OSError):
        return np.zeros((size, size), dtype=np.float32)
