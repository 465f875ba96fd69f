"""Magnitude pruning: zero the smallest |W| of each layer (layer-wide threshold), or per N:M group.

The classic baseline; no calibration data, no weight update.
"""
from __future__ import annotations

import torch

from methods import masks
from methods.base import LinearPruner
from methods.registry import register_pruner


@register_pruner("magnitude")
class Magnitude(LinearPruner):
    supports_nm = True

    @torch.no_grad()
    def prune_linear(self, weight: torch.Tensor, stats, sparsity: float) -> None:
        mask = masks.select(weight.abs().float(), sparsity, self.pattern, per_row=False)
        weight[mask] = 0
