"""The X-ray-pretrained encoder as a reusable module, its input contract attached.

``cxrcae.hub.resolve.load_encoder(ref)`` accepts any checkpoint kind (autoencoder, classifier, encoder-only),
from a local folder or a Hub id, and returns a ``PretrainedEncoder``: the paper's encoder (state-dict keys
``stages.*``, identical to an encoder-only checkpoint and to timm's ``cxrcae_vgg_cae``) that carries
``preprocess`` and a timm-style ``pretrained_cfg``, so a downstream project cannot feed it differently
prepared pixels by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrcae.errors import CxrcaeError
from cxrcae.io.resize import load_for_model, resize_xray
from cxrcae.models.cae import NUM_FEATURES, REDUCTION, CAEEncoder

# Pillow "L" conversion weights (ITU-R 601-2 luma): what load_xray does to RGB files, applied to RGB arrays.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
INTERPOLATION = "bicubic"  # cxrcae.io.resize_xray resamples with Pillow bicubic (antialiased when shrinking)


def pretrained_cfg_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """timm-style preprocessing metadata for a checkpoint's config.json (read by timm_models too)."""
    size = int(config.get("image_size", 224))
    in_chans = int(config.get("in_chans", 3))
    return {
        "architecture": "cxrcae_vgg_cae",
        "input_size": (in_chans, size, size),
        "fixed_input_size": False,
        "mean": tuple(float(v) for v in config.get("mean", (0.0, 0.0, 0.0))),
        "std": tuple(float(v) for v in config.get("std", (1.0, 1.0, 1.0))),
        "interpolation": INTERPOLATION,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "resize_mode": str(config.get("resize_mode", "stretch")),
        "pool_size": (size // REDUCTION, size // REDUCTION),
        "num_classes": 0,
        "num_features": NUM_FEATURES,
        "first_conv": "stages.conv1",
    }


class PretrainedEncoder(CAEEncoder):
    """``forward`` gives (B, 512, S/32, S/32) features, or (B, 512) global-average-pooled when ``pooled``.

    ``preprocess(path_or_array)`` turns a file (any format cxrcae.io reads), a path list, or an array into the
    exact input this encoder was trained on: (3, S, S) float32 in [0, 1] (a batch (B, 3, S, S) for a list).
    """

    def __init__(self, config: dict[str, Any], pooled: bool = False):
        super().__init__(int(config.get("in_chans", 3)))
        self.pooled = bool(pooled)
        self.image_size = int(config.get("image_size", 224))
        self.resize_mode = str(config.get("resize_mode", "stretch"))
        self.pretrained_cfg = pretrained_cfg_from_config(config)
        self.cxrcae_config = dict(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        return features.mean(dim=(2, 3)) if self.pooled else features

    def preprocess(self, image: Any) -> torch.Tensor:
        """Path, list of paths, or array -> model input, through the one pixel contract (cxrcae.io)."""
        if isinstance(image, (list, tuple)):
            if not image:
                raise CxrcaeError("preprocess got an empty list")
            return torch.stack([self.preprocess(item) for item in image])
        if isinstance(image, (str, Path)):
            return torch.from_numpy(load_for_model(image, self.image_size, self.resize_mode))
        return torch.from_numpy(self._prepare_array(image))

    def _prepare_array(self, image: Any) -> np.ndarray:
        gray = array_to_unit_gray(image)
        img = resize_xray(gray, self.image_size, self.resize_mode)
        return np.ascontiguousarray(np.broadcast_to(img, (3, *img.shape)), dtype=np.float32)


def array_to_unit_gray(image: Any) -> np.ndarray:
    """An in-memory image as HxW float32 in [0, 1].

    Integers are scaled by their dtype's maximum (uint8 /255, uint16 /65535); floats must already be in
    [0, 1]. HxWx3/4 (or 3xHxW) colour is converted with Pillow's luma weights, as files are.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise CxrcaeError(f"expected an HxW, HxWx3/4 or 3xHxW image array, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype.kind == "i" and arr.min() < 0:
            raise CxrcaeError("integer image arrays must not contain negative values")
        scaled = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    elif np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool:
        scaled = arr.astype(np.float32)
        if not np.isfinite(scaled).all():
            raise CxrcaeError("image array contains NaN or infinite values")
        if scaled.min() < 0.0 or scaled.max() > 1.0:
            raise CxrcaeError(
                f"float image arrays must be in [0, 1] (got {scaled.min():.4g}..{scaled.max():.4g}); "
                "pass integers or rescale first"
            )
    else:
        raise CxrcaeError(f"unsupported image array dtype {arr.dtype}")
    if scaled.ndim == 3:
        scaled = scaled[..., :3] @ _LUMA
    return np.ascontiguousarray(scaled, dtype=np.float32)
