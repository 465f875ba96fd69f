"""Components by the names the config gives them (`method.allocator`, `method.pruner`).

A component registers itself where it is defined, `@register_pruner("wanda")` on its class (the pattern of
lm-eval's registry); `methods.catalog` imports every component module, so whoever composes a method sees
them all. This module imports no component: a leaf may use the registry (Self-Pruner's fitness pruner)
without importing its siblings.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from bench.core.vocab import ConfigError

ALLOCATORS: dict[str, type] = {}
PRUNERS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    def add(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} is registered twice: {_path(table[name])} and {_path(cls)}")
        table[name] = cls
        return cls
    return add


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_allocator(name: str) -> Callable[[T], T]:
    return _register(ALLOCATORS, "allocator", name)


def register_pruner(name: str) -> Callable[[T], T]:
    return _register(PRUNERS, "pruner", name)


def _lookup(table: dict[str, type], key: str, name) -> type:
    if name not in table:
        raise ConfigError(f"{key}={name!r} is not known; available: {', '.join(sorted(table))}")
    return table[name]


def allocator(name, key: str = "method.allocator") -> type:
    """The allocator class registered as `name`; a ConfigError naming `key` and what is available if none."""
    return _lookup(ALLOCATORS, key, name)


def pruner(name, key: str = "method.pruner") -> type:
    """The pruner class registered as `name`; a ConfigError naming `key` and what is available if none."""
    return _lookup(PRUNERS, key, name)
