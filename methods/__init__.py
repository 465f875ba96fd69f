"""Pruning methods as the composition allocator x pruner (x recovery, its own config group).

- An *allocator* (`methods.base.Allocator`) decides the sparsity of every prunable linear.
- A *pruner* (`methods.base.Pruner`) removes weights inside one block given those rates; a structured
  one (`ChannelPruner`) removes FFN channels physically.
`methods.base` documents the lifecycle the engine drives. A component registers by one line in
`methods/allocators/__init__.py` or `methods/pruners/__init__.py`; its `Options` dataclass is the schema of its keys under `method.` in the config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bench.core.vocab import ConfigError, SparsityPattern, check_choice, check_range, typed
from methods.allocators import ALLOCATORS
from methods.base import Method
from methods.pruners import PRUNERS

__all__ = ["ALLOCATORS", "PRUNERS", "Method", "MethodSpec", "build", "parse"]

SPEC_KEYS = ("name", "display", "allocator", "pruner", "sparsity_type")


@dataclass
class MethodSpec:
    """A validated method config: allocator x pruner, each with its own typed options."""

    name: str
    allocator: str
    pruner: str
    pattern: SparsityPattern
    allocator_options: Any
    pruner_options: Any
    display: str = ""  # the name tables print ("OWL (Wanda)"); parse() sets it, to `name` when unset

    @property
    def dense(self) -> bool:
        return not PRUNERS[self.pruner].prunes


def parse(raw: dict) -> MethodSpec:
    """The `method:` section of a config as a MethodSpec; every key checked by its component's Options."""
    raw = dict(raw)
    name = raw.pop("name", None)
    display = raw.pop("display", None)
    allocator = raw.pop("allocator", "uniform")
    pruner = raw.pop("pruner", None)
    pattern = SparsityPattern.parse(str(raw.pop("sparsity_type", "unstructured")))
    check_choice("method.allocator", allocator, ALLOCATORS)
    check_choice("method.pruner", pruner, PRUNERS)
    check_range("method.display", display, display is None or (isinstance(display, str) and display.strip() != ""),
                "a non-empty string, or null for the method's name")
    alloc_schema, prune_schema = ALLOCATORS[allocator].Options, PRUNERS[pruner].Options
    alloc_keys = {f.name for f in dataclasses.fields(alloc_schema)}
    prune_keys = {f.name for f in dataclasses.fields(prune_schema)}
    unknown = sorted(set(raw) - alloc_keys - prune_keys)
    if unknown:
        allowed = [*SPEC_KEYS, *sorted(alloc_keys | prune_keys)]
        raise ConfigError(f"method.{unknown[0]} is not an option of allocator={allocator}, pruner={pruner}; "
                          f"allowed: {', '.join(allowed)}")
    return MethodSpec(
        name=name or pruner, display=display or name or pruner, allocator=allocator, pruner=pruner, pattern=pattern,
        allocator_options=typed("method", alloc_schema, {k: raw[k] for k in alloc_keys & set(raw)}),
        pruner_options=typed("method", prune_schema, {k: raw[k] for k in prune_keys & set(raw)}))


def build(spec: MethodSpec) -> Method:
    """The components of `spec`, with the checks that need both of them or the pattern."""
    allocator = ALLOCATORS[spec.allocator](spec.allocator_options)
    pruner = PRUNERS[spec.pruner](spec.pruner_options, spec.pattern)
    pruner.check(spec.pattern)
    if spec.pattern.kind == "nm" and spec.allocator != "uniform":
        raise ConfigError(f"method.sparsity_type={spec.pattern} fixes every layer's sparsity; "
                          f"allocator {spec.allocator} needs sparsity_type=unstructured")
    if pruner.structured and pruner.selection == "global" and spec.allocator != "uniform":
        raise ConfigError(f"method.selection=global picks every block's width itself and would ignore the "
                          f"per-block rates of allocator={spec.allocator}; allowed with it: method.selection=per_block")
    return Method(name=spec.name, allocator=allocator, pruner=pruner)
