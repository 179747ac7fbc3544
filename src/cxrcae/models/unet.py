"""A U-Net on the CAE encoder: the encoder's pre-pool activations are the skip connections.

The encoder (``cxrcae.models.cae.CAEEncoder``) runs conv1, conv2 at full resolution, then one convolution per
scale, each followed by a 2x2 max-pool. Its activations just before each pool are the skips, as in MONAI's
``FlexibleUNet`` (an encoder with skip outputs plus ``UNetDecoder``):

    conv2 -> 64 x S,  conv3 -> 128 x S/2,  conv4 -> 256 x S/4,  conv5 -> 512 x S/8,  conv6 -> 512 x S/16,
    bottleneck 512 x S/32.

The decoder climbs back five times: nearest 2x upsampling, the skip of that scale concatenated, two 3x3
convolutions with group norm and ReLU (MONAI's ``UpCat`` + ``TwoConv``; group norm rather than batch norm
because segmentation batches are small: it behaves the same in training and evaluation whatever the batch);
a 3x3 convolution then gives one logit map per structure at the input's resolution (its bias starts every
pixel at probability ``PRIOR``). Its channels (``decoder_channels``, default
256, 128, 64, 32, 16) are recorded in config.json. ``CXRSegmenter.encoder`` is the encoder under the same
name as the classifier's, so encoder weights load into it and fine-tuning stages freeze it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cxrcae.models.cae import ENCODER_CHANNELS, CAEEncoder, _check_input

DECODER_CHANNELS = (256, 128, 64, 32, 16)
SKIP_CHANNELS = tuple(reversed(ENCODER_CHANNELS[1:]))
"""Skip channels from the deepest up: conv6 (512), conv5 (512), conv4 (256), conv3 (128), conv2 (64)."""


GROUPS = 8
PRIOR = 0.1
"""Initial probability of every pixel (the head's bias, as in RetinaNet): structures cover a minority of
the image, and starting near that spares the first steps of only learning "background everywhere" (on
synthetic shapes, Dice 0.9 after 20 steps instead of 0 after 10)."""


class TwoConv(nn.Sequential):
    """(3x3 convolution, group norm, ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int):
        groups = math.gcd(GROUPS, out_channels)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Nearest 2x upsampling, the skip concatenated, ``TwoConv``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.convs = TwoConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.convs(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """Five ``UpBlock``s from the bottleneck to full resolution, then a 3x3 convolution to ``out_channels``
    logit maps."""

    def __init__(
        self,
        out_channels: int,
        channels: Sequence[int] = DECODER_CHANNELS,
        bottleneck: int = ENCODER_CHANNELS[-1],
        skips: Sequence[int] = SKIP_CHANNELS,
    ):
        super().__init__()
        if len(channels) != len(skips):
            raise ValueError(f"need {len(skips)} decoder channel counts, got {len(channels)}")
        blocks, prev = [], bottleneck
        for skip, ch in zip(skips, channels, strict=True):
            blocks.append(UpBlock(prev, skip, int(ch)))
            prev = int(ch)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(prev, out_channels, 3, padding=1)
        nn.init.constant_(self.head.bias, math.log(PRIOR / (1.0 - PRIOR)))

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = bottleneck
        for block, skip in zip(self.blocks, skips, strict=True):
            x = block(x, skip)
        return self.head(x)


class CXRSegmenter(nn.Module):
    """``forward``: (B, C, S, S) images -> (B, K, S, S) logits, one map per structure."""

    def __init__(self, encoder: CAEEncoder, decoder: UNetDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(bottleneck, skips deepest first): the encoder's layers in order, each pool's input kept."""
        _check_input(x, self.encoder.in_chans)
        skips = []
        for layer in self.encoder.stages:
            if isinstance(layer, nn.MaxPool2d):
                skips.append(x)
            x = layer(x)
        return x, skips[::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, skips = self.forward_features(x)
        return self.decoder(bottleneck, skips)
