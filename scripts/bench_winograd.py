"""Winograd F(2x2, 3x3) written in PyTorch ops against oneDNN's direct convolution: agreement and time.

One of the levers issue 11 asked to weigh (2.25x fewer multiplications for the stride-1 3x3 convolutions).
Forward pass only, batch 16, the encoder's layer shapes at 224 px, fp32. Run it with
``python scripts/bench_winograd.py``; docs/speed.md has the figures and why the lever was dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cxrcae.allocator import keep_freed_memory

B_T = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float32)
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float32)
A_T = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float32)
LAYERS = ((64, 64, 224), (128, 256, 56), (256, 512, 28))  # (in, out, side): conv2, conv4, conv5


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """'same' 3x3 stride-1 convolution of even-sized NCHW ``x`` through 4x4 tiles (2x2 outputs each)."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    u = torch.einsum("ij,kcjl,ml->imkc", G, weight, G).reshape(16, k, c)
    tiles = F.pad(x, (1, 1, 1, 1)).unfold(2, 4, 2).unfold(3, 4, 2)  # (N, C, H/2, W/2, 4, 4)
    v = torch.einsum("ij,nctsjl,ml->imcnts", B_T, tiles, B_T).reshape(16, c, -1)
    m = torch.bmm(u, v).reshape(4, 4, k, n, h // 2, w // 2)  # 16 GEMMs: the only multiplications left
    y = torch.einsum("ij,jlknts,ml->nktism", A_T, m, A_T)  # (N, K, H/2, 2, W/2, 2)
    return y.reshape(n, k, h, w) + bias.view(1, -1, 1, 1)


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def main() -> None:
    keep_freed_memory()
    torch.manual_seed(0)
    for c_in, c_out, side in LAYERS:
        x = torch.rand(16, c_in, side, side)
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        with torch.no_grad():
            ref = conv(x)
            diff = ((winograd_conv3x3(x, conv.weight, conv.bias) - ref).abs().max() / ref.abs().max()).item()
            x_nhwc = x.contiguous(memory_format=torch.channels_last)
            conv_nhwc = conv.to(memory_format=torch.channels_last)
            direct = median_seconds(lambda c=conv_nhwc, xx=x_nhwc: c(xx))
            wino = median_seconds(lambda c=conv, xx=x: winograd_conv3x3(xx, c.weight, c.bias))
        print(
            f"{c_in}->{c_out} at {side} px: direct (oneDNN, NHWC) {direct * 1e3:.0f} ms, "
            f"Winograd {wino * 1e3:.0f} ms ({direct / wino:.2f}x), max relative difference {diff:.1e}"
        )


if __name__ == "__main__":
    main()
