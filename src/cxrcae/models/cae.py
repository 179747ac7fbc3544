"""The paper's convolutional autoencoder (Tables 1 and 2).

Encoder: six 3x3 'same' convolutions with ReLU and five 2x2 max-pools, 224x224x3 -> 7x7x512
(3,947,712 parameters). Decoder: five 3x3 stride-2 transposed convolutions 512->512->256->128->64->3, ReLU on
all but the linear last layer, 7x7x512 -> 224x224x3 (3,910,275 parameters).

Geometry follows Keras exactly so the authors' released weights can be imported: a Keras 'same' transposed
convolution with stride 2 and kernel 3 places input pixel i at output pixels 2i..2i+2 and drops the last row
and column, which is PyTorch's ``ConvTranspose2d(padding=0)`` cropped to twice the input size (PyTorch's
``padding=1, output_padding=1`` would shift the output by one pixel).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

ENCODER_CHANNELS = (64, 64, 128, 256, 512, 512)
DECODER_CHANNELS = (512, 256, 128, 64)
REDUCTION = 32  # five 2x2 pools
NUM_FEATURES = 512


class CAEEncoder(nn.Module):
    """VGG-like encoder; ``forward_features`` returns the (B, 512, H/32, W/32) bottleneck."""

    num_features = NUM_FEATURES
    reduction = REDUCTION

    def __init__(self, in_chans: int = 3):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        prev = in_chans
        pool = 0
        for i, ch in enumerate(ENCODER_CHANNELS, start=1):
            layers[f"conv{i}"] = nn.Conv2d(prev, ch, kernel_size=3, padding=1)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            if i >= 2:  # the first two convolutions share a resolution, every later one is followed by a pool
                pool += 1
                layers[f"pool{pool}"] = nn.MaxPool2d(2)
            prev = ch
        self.stages = nn.Sequential(layers)
        self.in_chans = in_chans

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_chans)
        return self.stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class KerasSameConvTranspose2d(nn.ConvTranspose2d):
    """Stride-2 transposed convolution with Keras 'same' geometry (output exactly twice the input)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h, w = x.shape[-2:]
        s = self.stride[0]
        return super().forward(x)[..., : h * s, : w * s]


class CAEDecoder(nn.Module):
    """Five stride-2 transposed convolutions back to image space; the last layer is linear."""

    def __init__(self, out_chans: int = 3, in_features: int = NUM_FEATURES):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        prev = in_features
        for i, ch in enumerate(DECODER_CHANNELS, start=1):
            layers[f"deconv{i}"] = KerasSameConvTranspose2d(prev, ch)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            prev = ch
        layers[f"deconv{len(DECODER_CHANNELS) + 1}"] = KerasSameConvTranspose2d(prev, out_chans)
        self.stages = nn.Sequential(layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.stages(z)


class ConvAutoencoder(nn.Module):
    """Encoder + decoder trained with MSE reconstruction; ``encoder`` is what gets reused."""

    def __init__(self, encoder: CAEEncoder | None = None, decoder: CAEDecoder | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else CAEEncoder()
        self.decoder = decoder if decoder is not None else CAEDecoder()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _check_input(x: torch.Tensor, in_chans: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected a (B, {in_chans}, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % REDUCTION or w % REDUCTION:
        raise ValueError(f"image size must be divisible by {REDUCTION}, got {h}x{w}")
