"""A method as the config states it (`MethodSpec`: allocator x pruner with their typed options) and
built (`methods.base.Method`). Importing this module registers every component: it is the catalog of
what `method.allocator` and `method.pruner` may name (a new component adds its module to `COMPONENTS`).
"""
from __future__ import annotations


import dataclasses
from dataclasses import dataclass
from typing import Any

from bench.core.vocab import ConfigError, SparsityPattern, check_range, typed
from methods import registry
from methods.allocators import cfsp_coarse, loss_estimate, owl, self_pruner, uniform
from methods.base import Method
from methods.pruners import cfsp_fine, flap, magnitude, magnitude_sp, none, sparsegpt, wanda, wanda_sp

# Every component module, imported for its registration (`@register_allocator` / `@register_pruner`).
COMPONENTS = (cfsp_coarse, loss_estimate, owl, self_pruner, uniform,
              cfsp_fine, flap, magnitude, magnitude_sp, none, sparsegpt, wanda, wanda_sp)

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
        return not registry.PRUNERS[self.pruner].prunes


def parse(raw: dict) -> MethodSpec:
    """The `method:` section of a config as a MethodSpec; every key checked by its component's Options."""
    raw = dict(raw)
    name = raw.pop("name", None)
    display = raw.pop("display", None)
    allocator = raw.pop("allocator", "uniform")
    pruner = raw.pop("pruner", None)
    pattern = SparsityPattern.parse(str(raw.pop("sparsity_type", "unstructured")))
    alloc_class, prune_class = registry.allocator(allocator), registry.pruner(pruner)
    check_range("method.display", display, display is None or (isinstance(display, str) and display.strip() != ""),
                "a non-empty string, or null for the method's name")
    alloc_schema, prune_schema = alloc_class.Options, prune_class.Options
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
    allocator = registry.ALLOCATORS[spec.allocator](spec.allocator_options)
    pruner = registry.PRUNERS[spec.pruner](spec.pruner_options, spec.pattern)
    pruner.check(spec.pattern)
    if spec.pattern.kind == "nm" and spec.allocator != "uniform":
        raise ConfigError(f"method.sparsity_type={spec.pattern} fixes every layer's sparsity; "
                          f"allocator {spec.allocator} needs sparsity_type=unstructured")
    if pruner.structured and pruner.selection == "global" and spec.allocator != "uniform":
        raise ConfigError(f"method.selection=global picks every block's width itself and would ignore the "
                          f"per-block rates of allocator={spec.allocator}; allowed with it: method.selection=per_block")
    return Method(name=spec.name, allocator=allocator, pruner=pruner)
