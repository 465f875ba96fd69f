"""The dense baseline: prunes nothing, so every table has its reference row."""
from __future__ import annotations

from methods.base import LinearPruner
from methods.registry import register_pruner


@register_pruner("none")
class NoPruning(LinearPruner):
    prunes = False

    def prune_linear(self, weight, stats, sparsity: float) -> None:
        pass
