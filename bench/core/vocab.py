"""The words every layer shares: the config error, sparsity patterns, statistics levels, and the one
helper every component and config schema validates its options with.

Every error is a single line naming the key, the bad value and what is allowed, so a typo in a sweep
fails at start instead of an hour into a job.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A bad config value; the message is a single line meant for the user."""


# What a traversal collects per linear input: nothing, the column sums of x and x^2, or X^T X too.
STATS_LEVELS = ("none", "diag", "full")


def check_choice(key: str, value: Any, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed: {', '.join(map(str, allowed))}")


def check_range(key: str, value: Any, ok: bool, allowed: str) -> None:
    """`ok` is the caller's test of `value`; `allowed` says in words what passes it."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}")


def typed(key: str, schema: type, values: dict) -> Any:
    """`schema(**values)` through OmegaConf (types checked), errors turned into one-line ConfigErrors."""
    allowed = [f.name for f in dataclasses.fields(schema)]
    for name in values:
        if name not in allowed:
            raise ConfigError(f"{key}.{name} is not a known key; allowed: {', '.join(allowed)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf's errors (bad type, missing value) carry the key in `full_key`
        where = f"{key}.{exc.full_key}" if getattr(exc, "full_key", None) else key
        raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None


@dataclass(frozen=True)
class SparsityPattern:
    """`unstructured`, or N:M = at most N non-zeros in every M consecutive inputs (2:4 = 50%)."""

    kind: str  # "unstructured" | "nm"
    n: int = 0
    m: int = 0

    @staticmethod
    def parse(text: str) -> "SparsityPattern":
        if text == "unstructured":
            return SparsityPattern("unstructured")
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise ConfigError(
                f"method.sparsity_type={text!r} is not valid; allowed: 'unstructured' or 'N:M' (e.g. 2:4)")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ConfigError(f"method.sparsity_type={text!r}: need 0 < N < M (N non-zeros out of every M)")
        return SparsityPattern("nm", n, m)

    @property
    def implied_sparsity(self) -> Optional[float]:
        return 1 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return "unstructured" if self.kind == "unstructured" else f"{self.n}:{self.m}"


UNSTRUCTURED = SparsityPattern("unstructured")
