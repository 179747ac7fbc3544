"""Classification heads of the paper's Table 4, selectable by name.

All heads take the encoder's (B, 512, h, w) feature map. The LSTM heads read it as a sequence of h*w
tokens of 512 features in row-major order, exactly as Keras' ``Reshape((h*w, 512))`` does on NHWC features,
so the proposed model matches the paper layer for layer.

Parameter count: PyTorch's LSTM keeps two bias vectors (``bias_ih`` and ``bias_hh``) where Keras keeps one,
so the proposed model has 7,654,851 parameters here where Keras reports 7,652,803 (4 gates x 512 = 2,048
more). The function is the same: Keras weights import by putting their bias in ``bias_ih`` and zeros in
``bias_hh``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cxrcae.errors import CxrcaeError


class SequenceLSTM(nn.Module):
    """Stacked LSTMs returning the full sequence (Keras ``return_sequences=True``)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...]):
        super().__init__()
        sizes = (in_features, *hidden)
        self.layers = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in zip(sizes, sizes[1:]))
        self.out_features = hidden[-1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for lstm in self.layers:
            tokens, _ = lstm(tokens)
        return tokens


def feature_tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), the Keras Reshape of NHWC features."""
    return features.flatten(2).transpose(1, 2)


class LSTMHead(nn.Module):
    """LSTM(s) over the feature tokens, flattened, then a dense stack."""

    def __init__(
        self,
        n_classes: int,
        num_tokens: int,
        lstm_sizes: tuple[int, ...] = (512,),
        dense_sizes: tuple[int, ...] = (64,),
        dropout: float = 0.0,
        in_features: int = 512,
    ):
        super().__init__()
        self.lstm = SequenceLSTM(in_features, lstm_sizes)
        self.classifier = _dense_stack(num_tokens * self.lstm.out_features, dense_sizes, n_classes, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        seq = self.lstm(feature_tokens(features))
        return self.classifier(seq.flatten(1))


class DenseHead(nn.Module):
    """Flatten the feature map (NHWC order, as Keras does) and apply a dense stack."""

    def __init__(
        self,
        n_classes: int,
        num_tokens: int,
        dense_sizes: tuple[int, ...] = (1024, 512, 256, 64),
        dropout: float = 0.2,
        in_features: int = 512,
    ):
        super().__init__()
        self.classifier = _dense_stack(num_tokens * in_features, dense_sizes, n_classes, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(feature_tokens(features).flatten(1))


def _dense_stack(in_features: int, sizes: tuple[int, ...], n_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_features
    for size in sizes:
        layers += [nn.Linear(prev, size), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        prev = size
    layers.append(nn.Linear(prev, n_classes))  # logits; softmax lives in the loss / at prediction time
    return nn.Sequential(*layers)


# name -> (description, builder(n_classes, num_tokens))
HEADS: dict[str, tuple[str, Callable[[int, int], nn.Module]]] = {
    "lstm": (
        "1 LSTM + 2 Dense (proposed): LSTM(512) -> Flatten -> Dense(64, ReLU) -> Dense(n)",
        lambda n, t: LSTMHead(n, t, (512,), (64,)),
    ),
    "lstm3": (
        "3 LSTM + 2 Dense: LSTM 512 -> 256 -> 128 -> Flatten -> Dense(64, ReLU) -> Dense(n)",
        lambda n, t: LSTMHead(n, t, (512, 256, 128), (64,)),
    ),
    "lstm-dense3": (
        "1 LSTM + 3 Dense: LSTM(512) -> Flatten -> Dense 512 -> 64 (ReLU, dropout 0.2) -> Dense(n)",
        lambda n, t: LSTMHead(n, t, (512,), (512, 64), dropout=0.2),
    ),
    "dense5": (
        "5 Dense: Flatten -> 1024 -> 512 -> 256 -> 64 (ReLU, dropout 0.2) -> Dense(n)",
        lambda n, t: DenseHead(n, t, (1024, 512, 256, 64), dropout=0.2),
    ),
}


def build_head(name: str, n_classes: int, image_size: int, reduction: int = 32) -> nn.Module:
    """The head sizes follow from the input size: (image_size / 32)^2 feature tokens."""
    if name not in HEADS:
        raise CxrcaeError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    if image_size % reduction:
        raise CxrcaeError(f"image size must be divisible by {reduction}, got {image_size}")
    side = image_size // reduction
    return HEADS[name][1](n_classes, side * side)
