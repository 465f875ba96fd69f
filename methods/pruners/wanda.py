"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score S_ij = |W_ij| * ||X_j||_2, where ||X_j|| is the L2 norm of input feature j over all calibration
tokens; the lowest scores are removed *per output row* (the paper's comparison group), no update.
"""
from __future__ import annotations

import torch

from methods import masks
from methods.base import LinearPruner
from methods.registry import register_pruner


@register_pruner("wanda")
class Wanda(LinearPruner):
    stats_level = "diag"
    supports_nm = True

    @torch.no_grad()
    def prune_linear(self, weight: torch.Tensor, stats, sparsity: float) -> None:
        scores = weight.abs().float() * stats.col_norms().to(weight.device).unsqueeze(0)
        mask = masks.select(scores, sparsity, self.pattern, per_row=True)
        weight[mask] = 0
