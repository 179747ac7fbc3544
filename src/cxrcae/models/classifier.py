"""Encoder + swappable head; the encoder is byte-for-byte the autoencoder's, so reuse needs no surgery."""

from __future__ import annotations

import torch
from torch import nn

from cxrcae.models.cae import CAEEncoder


class CXRClassifier(nn.Module):
    """``forward`` is ``forward_features`` (the pretrained encoder) then ``forward_head`` (logits)."""

    def __init__(self, encoder: CAEEncoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
