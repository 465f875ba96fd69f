"""The dense baseline: prunes nothing, so every table has its reference row."""
from __future__ import annotations

from methods.base import LinearPruner


class NoPruning(LinearPruner):
    prunes = False

    def prune_linear(self, weight, stats, sparsity: float) -> None:
        pass
