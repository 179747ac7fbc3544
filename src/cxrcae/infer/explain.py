"""Grad-CAM (Selvaraju et al. 2017) on the encoder's last convolution, and heat-map overlays.

A short hook-based implementation rather than a dependency: the activation of ``encoder.stages.relu6``
(the last convolution, before the last pooling, so 14x14 at 224 px) is captured by a forward hook, the
gradient of the explained class's logit with respect to it is taken with ``torch.autograd.grad``, each
channel is weighted by its mean gradient, and the ReLU of the weighted sum is upsampled to the input and
scaled to [0, 1] per image. Shows where the model looked, not why; it is a sanity check for shortcuts
(text markers, borders), not a localisation of disease.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import nn

from cxrcae._atomic import atomic_write_bytes

DEFAULT_LAYER = "encoder.stages.relu6"


class GradCAM:
    """``cam(images, classes=None) -> (logits, heatmaps)``: heatmaps (B, H, W) float32 in [0, 1].

    ``classes`` (B,) picks the class to explain per image; default: the predicted class.
    """

    def __init__(self, model: nn.Module, layer: str = DEFAULT_LAYER):
        self.model = model
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"model has no layer {layer!r} to explain")
        self.layer = modules[layer]

    def __call__(
        self, images: torch.Tensor, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            # cuDNN refuses RNN backward in eval mode; the LSTM heads run on the native kernel here.
            with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
                x = images.detach().requires_grad_(False)
                logits = self.model(x)
                if classes is None:
                    classes = logits.argmax(dim=1)
                score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
                (grads,) = torch.autograd.grad(score, captured[0])
        finally:
            handle.remove()
        acts = captured[0].detach()
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        flat = cam.flatten(1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        span = (hi - lo).clamp_min(1e-12)
        cam = ((cam - lo[:, None, None]) / span[:, None, None]).clamp(0, 1)
        cam[hi <= lo] = 0.0
        return logits.detach(), cam.float()


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Gray (H, W) image in [0, 1] + (H, W) heat-map in [0, 1] -> uint8 RGB with a jet colour overlay."""

    gray = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    heat = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3].astype(np.float32)
    mix = (1 - alpha) * gray[..., None] + alpha * heat
    return (np.clip(mix, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_overlay(path: str | Path, image: np.ndarray, heatmap: np.ndarray) -> Path:
    """Write ``input | overlay`` side by side as a PNG (atomically)."""

    gray = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    both = np.concatenate([np.repeat(gray[..., None], 3, axis=2), overlay(image, heatmap)], axis=1)
    buf = io.BytesIO()
    Image.fromarray(both).save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
