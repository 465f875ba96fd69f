"""The dense baseline: prunes nothing, so every table has its reference row."""
from __future__ import annotations

from dataclasses import dataclass

from bench.config import SparsityPattern
from methods.base import LinearPruner


class NoPruning(LinearPruner):
    stats_level = "none"
    supports_nm = False

    @dataclass
    class Options(LinearPruner):
        pass

    def __init__(self, options: Options, pattern: SparsityPattern):
        pass

    def prune_linear(self, weight, stats, sparsity: float) -> None:
        pass
