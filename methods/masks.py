"""Mask selection shared by the pruners: given importance scores, which weights to zero.

A mask is a bool tensor shaped like the weight, True where the weight is pruned. Lower score = pruned.
"""
from __future__ import annotations

import torch

from bench.core.vocab import SparsityPattern


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the m - n lowest-scored weights in every group of m consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    drop = groups.topk(m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def lowest_fraction_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune exactly int(sparsity * count) lowest scores, over the whole matrix or within each row: the
    references' count (Wanda's and OWL's `int(W.shape[1] * sparsity)`), truncated, not rounded."""
    if per_row:
        k = int(scores.shape[1] * sparsity)
        drop = scores.topk(k, dim=1, largest=False).indices if k else scores.new_empty(scores.shape[0], 0).long()
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, drop, True)
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[scores.flatten().topk(k, largest=False).indices] = True
    return mask.view_as(scores)


def threshold_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """SparseGPT's rule: prune every score <= the int(sparsity * count)-th smallest (0-based), i.e. one
    more than int(sparsity * count), more on ties. At sparsity 0 nothing is pruned (the reference would
    prune the minimum; our allocators hand some layers 0)."""
    if sparsity == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.flatten().sort().values[int(scores.numel() * sparsity)]
    return scores <= threshold


def select(scores: torch.Tensor, sparsity: float, pattern: SparsityPattern, per_row: bool) -> torch.Tensor:
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    return lowest_fraction_mask(scores, sparsity, per_row)
