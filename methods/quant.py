"""Uniform min-max weight quantization (the GPTQ / SparseGPT grid), shared by the joint
sparsity + quantization path of SparseGPT.

Each output channel (row), or each group of `groupsize` consecutive inputs of a row, gets an asymmetric
grid of 2^bits levels spanning [min(w, 0), max(w, 0)]: the range always contains 0, so 0 sits exactly
on the grid and weights pruned to 0 stay 0 after quantization. Values are stored dequantized (float),
which is what perplexity evaluation needs; packing into integers is out of scope.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)  # method.wbits; null = no quantization


@dataclass
class Grid:
    """Per-row grid: q(x) = scale * (clamp(round(x / scale) + zero, 0, maxq) - zero)."""

    scale: torch.Tensor  # (rows, 1)
    zero: torch.Tensor  # (rows, 1), an integer in [0, maxq]
    maxq: int

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        levels = torch.clamp(torch.round(x / self.scale) + self.zero, 0, self.maxq)
        return self.scale * (levels - self.zero)


def minmax_grid(W: torch.Tensor, bits: int) -> Grid:
    """The min-max grid of every row of W (rows x cols); an all-zero row gets scale 1."""
    maxq = 2 ** bits - 1
    low = W.min(dim=1, keepdim=True).values.clamp(max=0)
    high = W.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = (high - low) / maxq
    scale[scale == 0] = 1
    zero = torch.round(-low / scale)
    return Grid(scale=scale, zero=zero, maxq=maxq)


def quantize_rtn(W: torch.Tensor, bits: int, groupsize: int | None = None) -> torch.Tensor:
    """Round-to-nearest on the min-max grid of each row (or row group): no error compensation."""
    if groupsize is None:
        return minmax_grid(W, bits).quantize(W)
    out = torch.empty_like(W)
    for start in range(0, W.shape[1], groupsize):
        part = W[:, start:start + groupsize]
        out[:, start:start + groupsize] = minmax_grid(part, bits).quantize(part)
    return out
