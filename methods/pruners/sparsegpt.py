"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"), written to be read beside Algorithm 1 of the paper.

For a linear layer with weights W (rows x cols) and calibration inputs X, minimise ||WX - W'X||^2
under a sparsity mask. With H = 2 X X^T (cols x cols) the optimal-brain-surgeon (OBS) step for removing
weight w_q of a row is

    error  = w_q^2 / [H^-1]_qq                         (saliency, used to choose the mask)
    update = -(w_q / [H^-1]_qq) * H^-1[:, q]           (applied to the not-yet-processed weights)

SparseGPT processes columns left to right, so every row shares one sequence of inverse Hessians; those
are read off the upper Cholesky factor of H^-1 (row i of the factor, divided by its diagonal, is the
OBS update restricted to columns >= i). The mask is chosen adaptively per block of `blocksize`
columns (w^2/[U]_ii^2 <= its int(sparsity * count)-th smallest value over the block, the
reference's rule: one weight more than the target fraction per block, more on ties), and for N:M
patterns per group of M columns, just before those columns are processed.

Joint quantization (`wbits`, section 3.5 of the paper): every kept weight is replaced by its value on
a min-max grid (`methods/quant.py`) at the moment its column is processed, and the rounding error is
compensated by the same OBS update as the pruning error, exactly as GPTQ does. The grid is per output
row, from the weights as they stand before the first column is processed; with `groupsize` it is
recomputed from the current (already updated) weights at the start of every group of columns, which
must lie inside one lazy-update block (blocksize % groupsize == 0). Pruned weights are 0, which is on
every grid, so quantization never undoes pruning; kept weights may round to 0, so the measured
sparsity of a quantized model can exceed its target. At sparsity 0 this is GPTQ (quantize only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bench.core.vocab import ConfigError, SparsityPattern, check_choice, check_range
from methods import masks, quant
from methods.base import LinearPruner
from methods.registry import register_pruner


@register_pruner("sparsegpt")
class SparseGPT(LinearPruner):
    stats_level = "full"
    supports_nm = True
    changes_kept = True  # the OBS update of the weights it keeps

    @dataclass
    class Options:
        blocksize: int = 128  # columns whose mask is chosen together (lazy batch of updates)
        percdamp: float = 0.01  # dampening: lambda = percdamp * mean(diag H), added to diag H
        wbits: Optional[int] = None  # quantize the kept weights to this many bits (None: no quantization)
        groupsize: Optional[int] = None  # quantization grid per this many input columns (None: per row)

        def __post_init__(self):
            check_range("method.blocksize", self.blocksize, self.blocksize >= 1, ">= 1")
            check_range("method.percdamp", self.percdamp, 0 <= self.percdamp < 1, "0 <= percdamp < 1")
            if self.wbits is not None:
                check_choice("method.wbits", self.wbits, quant.SUPPORTED_BITS)
            if self.groupsize is not None:
                if self.wbits is None:
                    raise ConfigError(f"method.groupsize={self.groupsize} needs method.wbits (quantization)")
                check_range("method.groupsize", self.groupsize,
                            self.groupsize >= 1 and self.blocksize % self.groupsize == 0,
                            f"a divisor of method.blocksize={self.blocksize}")

    @property
    def bits(self) -> Optional[int]:
        return self.options.wbits

    def check(self, pattern: SparsityPattern) -> None:
        super().check(pattern)
        if pattern.kind == "nm" and self.options.blocksize % pattern.m:
            raise ConfigError(f"method.blocksize={self.options.blocksize} must be a multiple of M={pattern.m} "
                              f"for sparsity_type={pattern}")

    @torch.no_grad()
    def prune_linear(self, weight: torch.Tensor, stats, sparsity: float) -> None:
        pruned = sparsegpt(weight.float(), stats.hessian().to(weight.device), sparsity, self.pattern,
                           self.options.blocksize, self.options.percdamp, self.options.wbits,
                           self.options.groupsize)
        weight.copy_(pruned.to(weight.dtype))


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened H^-1, and the mask of dead inputs (never active: H_jj = 0)."""
    H = hessian.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1  # a never-active input carries no information; its weights are zeroed anyway
    damp = percdamp * H.diagonal().mean()
    H.diagonal().add_(damp)
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(H_inv, upper=True), dead


def sparsegpt(W: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: SparsityPattern,
              blocksize: int = 128, percdamp: float = 0.01, wbits: Optional[int] = None,
              groupsize: Optional[int] = None) -> torch.Tensor:
    """Return the pruned (and OBS-updated, optionally quantized) copy of W (float32)."""
    W = W.clone()
    rows, cols = W.shape
    U, dead = inverse_hessian_factor(hessian, percdamp)
    W[:, dead] = 0
    grid = quant.minmax_grid(W, wbits) if wbits is not None and groupsize is None else None
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        W_block = W[:, start:end].clone()
        U_block = U[start:end, start:end]
        errors = torch.zeros_like(W_block)
        if pattern.kind == "unstructured":
            saliency = W_block ** 2 / U_block.diagonal().unsqueeze(0) ** 2
            mask = masks.threshold_mask(saliency, sparsity)
        else:
            mask = torch.zeros_like(W_block, dtype=torch.bool)
        for i in range(end - start):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                saliency = W_block[:, group] ** 2 / U_block.diagonal()[group].unsqueeze(0) ** 2
                mask[:, group] = masks.nm_mask(saliency, pattern.n, pattern.m)
            if wbits is not None and groupsize is not None and (start + i) % groupsize == 0:
                grid = quant.minmax_grid(W_block[:, i:i + groupsize], wbits)
            w = W_block[:, i]
            d = U_block[i, i]
            q = w.masked_fill(mask[:, i], 0)
            if grid is not None:
                q = grid.quantize(q.unsqueeze(1)).squeeze(1)
            err = (w - q) / d
            # OBS update of the remaining columns of this block (row i of the factor = H^-1 row, scaled)
            W_block[:, i:] -= err.unsqueeze(1) * U_block[i, i:].unsqueeze(0)
            W_block[:, i] = q
            errors[:, i] = err
        W[:, start:end] = W_block
        # lazy batch update: propagate the whole block's errors to the columns on its right at once
        W[:, end:] -= errors @ U[start:end, end:]
    return W
