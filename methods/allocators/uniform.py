"""Uniform allocation: every prunable linear gets the target sparsity."""
from __future__ import annotations

from dataclasses import dataclass


class Uniform:
    needs_dense_pass = False

    @dataclass
    class Options:
        pass

    def __init__(self, options: Options):
        pass

    def check(self, target: float, n_layers) -> None:
        pass  # every target in [0, 1) is valid

    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        return {name: target for name in sizes}
