"""A method as the config states it (`MethodSpec`: allocator x pruner with their typed options) and
built (`methods.base.Method`). Importing this module registers every component: it is the catalog of
what `method.allocator` and `method.pruner` may name (a new component adds its module to `COMPONENTS`).
"""
from __future__ import annotations


import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any

from bench.core.vocab import ConfigError, SparsityPattern, check_range, typed
from methods import registry
from methods.allocators import cfsp_coarse, loss_estimate, owl, self_pruner, uniform
from methods.base import DEFAULT_TARGETS, Method
from methods.pruners import cfsp_fine, flap, magnitude, magnitude_sp, none, sparsegpt, wanda, wanda_sp

# Every component module, imported for its registration (`@register_allocator` / `@register_pruner`).
COMPONENTS = (cfsp_coarse, loss_estimate, owl, self_pruner, uniform,
              cfsp_fine, flap, magnitude, magnitude_sp, none, sparsegpt, wanda, wanda_sp)

SPEC_KEYS = ("name", "display", "allocator", "pruner", "sparsity_type", "targets", "ignore")


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
    targets: tuple = DEFAULT_TARGETS  # which linears are pruned, as llm-compressor's targets/ignore
    ignore: tuple = ()

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
    targets = _patterns("method.targets", raw.pop("targets", list(DEFAULT_TARGETS)), least=1)
    ignore = _patterns("method.ignore", raw.pop("ignore", []), least=0)
    alloc_class, prune_class = registry.allocator(allocator), registry.pruner(pruner)
    check_range("method.display", display, display is None or (isinstance(display, str) and display.strip() != ""),
                "a non-empty string, or null for the method's name")
    alloc_schema, prune_schema = alloc_class.Options, prune_class.Options
    alloc_keys = {f.name for f in dataclasses.fields(alloc_schema)}
    prune_keys = {f.name for f in dataclasses.fields(prune_schema)}
    unknown = sorted(set(raw) - alloc_keys - prune_keys)
    if unknown:
        allowed = [*SPEC_KEYS, *sorted(alloc_keys | prune_keys)]
        close = difflib.get_close_matches(unknown[0], allowed, n=1, cutoff=0.6)
        raise ConfigError(f"method.{unknown[0]} is not an option of allocator={allocator}, pruner={pruner}"
                          + (f"; did you mean method.{close[0]}?" if close else "") + f"; allowed: {', '.join(allowed)}")
    if (targets, ignore) != (DEFAULT_TARGETS, ()) and (prune_class.structured or not prune_class.prunes):
        why = "removes FFN channels, which couple its linears" if prune_class.prunes else "prunes nothing"
        raise ConfigError(f"method.targets={list(targets)}, method.ignore={list(ignore)}: pruner={pruner} {why}; "
                          f"allowed with it: the defaults, targets=[Linear] and ignore=[]")
    return MethodSpec(
        name=name or pruner, display=display or name or pruner, allocator=allocator, pruner=pruner, pattern=pattern,
        targets=targets, ignore=ignore,
        allocator_options=typed("method", alloc_schema, {k: raw[k] for k in alloc_keys & set(raw)}),
        pruner_options=typed("method", prune_schema, {k: raw[k] for k in prune_keys & set(raw)}))


def _patterns(key: str, value: Any, least: int) -> tuple:
    """A list of llm-compressor patterns: names, class names, or `re:<regex>` (checked to compile)."""
    ok = isinstance(value, (list, tuple)) and len(value) >= least and all(isinstance(p, str) and p.strip()
                                                                          for p in value)
    check_range(key, value, ok, f"a list of {'at least one of ' if least else ''}module names, class names (Linear) "
                f"or re:<regex> patterns")
    for pattern in value:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ConfigError(f"{key}: {pattern!r} is not a regular expression ({exc}); allowed: "
                                  f"re:<a Python regex>, matched against full module names") from None
    return tuple(value)


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
    return Method(name=spec.name, allocator=allocator, pruner=pruner, targets=spec.targets, ignore=spec.ignore)
