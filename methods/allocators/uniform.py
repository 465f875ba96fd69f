"""Uniform allocation: every prunable linear gets the target sparsity."""
from __future__ import annotations

from methods.base import Allocator
from methods.registry import register_allocator


@register_allocator("uniform")
class Uniform(Allocator):
    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        return {name: target for name in sizes}
