"""The paper's convolutional autoencoder (Tables 1 and 2).

Encoder: six 3x3 'same' convolutions with ReLU and five 2x2 max-pools, 224x224x3 -> 7x7x512
(3,947,712 parameters). Decoder: five 3x3 stride-2 transposed convolutions 512->512->256->128->64->3, ReLU on
all but the linear last layer, 7x7x512 -> 224x224x3 (3,910,275 parameters).

Geometry follows Keras exactly so the authors' released weights can be imported: a Keras 'same' transposed
convolution with stride 2 and kernel 3 places input pixel i at output pixels 2i..2i+2 and drops the last row
and column, which is PyTorch's ``ConvTranspose2d(padding=0)`` cropped to twice the input size (PyTorch's
``padding=1, output_padding=1`` would shift the output by one pixel).

Two CPU formulations with the same results as the plain layer order (checked in tests/test_models.py), kept
because ``cxrcae bench`` measured them faster; ``cxrcae.models.cae.FAST_PATHS = False`` turns both off:
- each transposed convolution runs as the input gradient of its stride-2 convolution (oneDNN's strided
  backward-data kernel) instead of oneDNN's deconvolution primitive: the same sums, about 1.4x faster over
  forward and backward on the decoder;
- ReLU then 2x2 max-pool runs as max-pool then ReLU: both are monotone, so outputs and gradients are
  identical, and the ReLU (and its backward) touch a quarter of the elements.
Neither applies while exporting (ONNX, tracing), under autocast, off the CPU, or while a hook watches the
encoder's modules (timm features, Grad-CAM see every activation in the documented order).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

ENCODER_CHANNELS = (64, 64, 128, 256, 512, 512)
DECODER_CHANNELS = (512, 256, 128, 64)
REDUCTION = 32  # five 2x2 pools
NUM_FEATURES = 512
FAST_PATHS = True


def _fast_path(x: torch.Tensor) -> bool:
    """Whether the CPU formulations of the module docstring may replace the plain layer calls here."""
    return (
        FAST_PATHS
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


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
        if not _fast_path(x) or _hooked(self.stages):
            return self.stages(x)
        layers = list(self.stages)
        i = 0
        while i < len(layers):
            if (
                isinstance(layers[i], nn.ReLU)
                and i + 1 < len(layers)
                and isinstance(layers[i + 1], nn.MaxPool2d)
            ):
                x = F.relu(layers[i + 1](x), inplace=True)  # pool then ReLU: identical, 4x fewer elements
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class KerasSameConvTranspose2d(nn.ConvTranspose2d):
    """Stride-2 transposed convolution with Keras 'same' geometry (output exactly twice the input)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h, w = x.shape[-2:]
        s = self.stride[0]
        if _fast_path(x) and x.dim() == 4 and x.dtype == self.weight.dtype and self.bias is not None:
            return _StridedInputGradient.apply(x, self.weight, self.bias, s)
        return super().forward(x)[..., : h * s, : w * s]


class _StridedInputGradient(torch.autograd.Function):
    """Keras-'same' transposed convolution as the input gradient of the stride-s convolution it inverts.

    A stride-s 'valid' convolution of an (s*h+1)-pixel image gives h pixels; its input gradient spreads
    each of them over kernel taps s*i..s*i+k-1, which is the transposed convolution before the crop. The
    backward pass is that convolution itself (for x) and its weight gradient with the roles swapped (for w).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
        n, _, h, w = x.shape
        fmt = _memory_format(x)
        full = (n, weight.shape[1], stride * h + 1, stride * w + 1)
        shape_only = torch.empty(full, dtype=x.dtype).contiguous(memory_format=fmt)  # read for its sizes
        spread, _, _ = torch.ops.aten.convolution_backward(
            x, shape_only, weight, None, (stride, stride), (0, 0), (1, 1), False, (0, 0), 1,
            (True, False, False),
        )  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.full, ctx.fmt = stride, full, fmt
        out = spread[..., : stride * h, : stride * w] + bias.view(1, -1, 1, 1)
        return out.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        s = ctx.stride
        padded = grad.new_empty(ctx.full).contiguous(
            memory_format=ctx.fmt
        )  # the crop's dropped row/column: 0
        padded[..., : grad.shape[-2], : grad.shape[-1]] = grad
        padded[..., grad.shape[-2] :, :] = 0
        padded[..., :, grad.shape[-1] :] = 0
        grad_x = F.conv2d(padded, weight, None, s) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            _, grad_w, _ = torch.ops.aten.convolution_backward(
                x, padded, weight, None, (s, s), (0, 0), (1, 1), False, (0, 0), 1, (False, True, False)
            )
        grad_b = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )


def _hooked(root: nn.Module) -> bool:
    """Whether any hook watches ``root`` or a module in it (then every layer must run as itself)."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in root.modules())


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
