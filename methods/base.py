"""Shared base of pruners."""
from __future__ import annotations


class LinearPruner:
    """Base of pruners that decide each linear on its own, from its weight and input statistics."""

    def prune_block(self, view, rates: dict[str, float]) -> None:
        for name, linear in view.linears.items():
            self.prune_linear(linear.weight.data, view.stats.get(name), rates[name])

    def prune_linear(self, weight, stats, sparsity: float) -> None:
        raise NotImplementedError
