"""``reconstruct``: the convolutional autoencoder's task (the paper's unsupervised phase).

Mean squared error between the reconstruction and the input. During the first epoch the objective also keeps
per-pixel sums of the images it scores, which gives the mean-image baseline (the validation MSE of always
answering the mean training image, the bar a useful autoencoder must clear) without decoding the data a
second time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.tasks.base import EpochOutputs, Objective, Task


class Reconstruction(Objective):
    """MSE between reconstruction and input, plus the mean-image baseline (see the module docstring)."""

    name = "mse"

    def __init__(self) -> None:
        self._train_sum: torch.Tensor | None = None
        self._val_sum: torch.Tensor | None = None
        self._val_sumsq: torch.Tensor | None = None
        self._n = {"train": 0, "val": 0}
        self.baseline: dict[str, Any] | None = None

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        out = model(images)
        if self.baseline is None:
            self._observe(images, "train" if model.training else "val")
        return F.mse_loss(out.float(), images.float()), out

    def _observe(self, images: torch.Tensor, split: str) -> None:
        x = images.detach().double().cpu()
        self._n[split] += len(x)
        if split == "train":
            self._train_sum = _add(self._train_sum, x.sum(0))
        else:
            self._val_sum, self._val_sumsq = (
                _add(self._val_sum, x.sum(0)),
                _add(self._val_sumsq, (x * x).sum(0)),
            )

    def epoch_metrics(self, stats: EpochOutputs) -> dict[str, Any]:
        n_train, n_val = self._n["train"], self._n["val"]
        if self.baseline is None and n_train and n_val:
            mean = self._train_sum / n_train
            # sum over validation images of (x - mean)^2, from their per-pixel sums
            sq = self._val_sumsq - 2 * mean * self._val_sum + n_val * mean * mean
            mse = (sq / n_val).clamp_min(0).mean().item()
            self.baseline = {"val_mse_mean_image": mse, "train_images": n_train, "val_images": n_val}
            self._train_sum = self._val_sum = self._val_sumsq = None
        return {}

    def state(self) -> dict[str, Any]:
        return {"baseline": self.baseline}

    def load_state(self, state: dict[str, Any]) -> None:
        self.baseline = state.get("baseline")


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


class Reconstruct(Task):
    name = "reconstruct"
    kind = "autoencoder"
    description = "image reconstruction by a convolutional autoencoder (unsupervised pretraining)"
    labelled = False

    def build(self, config: dict[str, Any]) -> nn.Module:
        in_chans = int(config.get("in_chans", 3))
        return ConvAutoencoder(CAEEncoder(in_chans), CAEDecoder(in_chans))

    def example(self, image_size: int = 32) -> tuple[dict[str, Any], torch.Tensor]:
        return {"task": self.name, "kind": self.kind, "image_size": image_size}, torch.zeros(2)

    def objective(self, config: dict[str, Any], **_: Any) -> Objective:
        return Reconstruction()

    def card_summary(self, config: dict[str, Any]) -> str:
        return "Reconstructs an X-ray through a 7x7x512 bottleneck; its encoder is the reusable part."
