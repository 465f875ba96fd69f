"""OWL: Outlier Weighed Layerwise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity
(OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", arXiv 2310.05175).

On the dense model, for each decoder block, take Wanda's score A_ij = |W_ij| * ||X_j||_2 of every
weight of every prunable linear in the block (pooled), and its outlier ratio D = the fraction of
scores above `m` times their mean (the paper's M = 5). The ratios are min-max scaled to [0, 2*lam]
(the paper's lambda = 0.08) and the block's sparsity is target - (scaled - mean scaled): more outliers,
lower sparsity, within target +- 2*lam, with the mean preserved. As in the paper, every linear of a
block gets the block's rate; the mean is weighted by parameters, which for equally sized blocks is
the paper's plain mean over blocks. Statistics come from an observe-only pass over the dense model
(each block fed the dense outputs of the previous one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from bench.core.vocab import ConfigError, check_range
from methods.base import Allocator
from methods.registry import register_allocator


@register_allocator("owl")
class OWL(Allocator):
    needs_dense_pass = True
    observe_level = "diag"

    @dataclass
    class Options:
        m: float = 5.0  # outlier threshold, in multiples of the block's mean score
        lam: float = 0.08  # half-width of the scaled outlier ratios (rates stay within target +- 2 lam)

        def __post_init__(self):
            check_range("method.m", self.m, self.m > 0, "> 0")
            check_range("method.lam", self.lam, 0 <= self.lam < 0.5, "0 <= lam < 0.5")

    def __init__(self, options: Options):
        super().__init__(options)
        self.ratios: dict[int, float] = {}  # block index -> outlier ratio
        self.block_of: dict[str, int] = {}  # linear -> block index

    def check(self, target: float, n_layers: Optional[int]) -> None:
        spread = 2 * self.options.lam
        if not spread <= target < 1 - spread:
            raise ConfigError(f"sparsity={target} with method.lam={self.options.lam} could give rates outside "
                              f"[0, 1); allowed: {spread:g} <= sparsity < {1 - spread:g} (or lower method.lam)")

    def dense_state(self) -> dict:
        return {"ratios": self.ratios, "block_of": self.block_of}

    def load_dense_state(self, state: dict) -> None:
        self.ratios, self.block_of = state["ratios"], state["block_of"]

    @torch.no_grad()
    def observe_block(self, view) -> None:
        scores = torch.cat([(linear.weight.abs().float() * view.stats[name].col_norms().unsqueeze(0)).flatten()
                            for name, linear in view.linears.items()])
        self.ratios[view.index] = float((scores > self.options.m * scores.mean()).float().mean())
        for name in view.linears:
            self.block_of[name] = view.index

    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        names = list(sizes)
        ratios = np.array([self.ratios[self.block_of[name]] for name in names])
        weights = np.array([sizes[name] for name in names], dtype=np.float64)
        width = ratios.max() - ratios.min()
        scaled = (ratios - ratios.min()) / width * 2 * self.options.lam if width > 0 else np.zeros_like(ratios)
        rates = target - (scaled - (scaled * weights).sum() / weights.sum())
        return {name: float(rate) for name, rate in zip(names, rates)}
