"""The chat contract between a search and the LLM backends that answer it (`bench.llm` implements it):
the `method.llm` keys (`LLMConfig`), the answer's grammar (`RatesSchema`), how an answer is read
(`parse_rates`), the errors, and `Replay`, the backend that answers from a recorded search.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import urllib.parse
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional, Protocol

from bench.core.records import RESULT_FILE, CorruptResult, read_result
from bench.core.vocab import ConfigError, check_choice, check_range

BACKENDS = ("local", "http")


@dataclass
class LLMConfig:
    """The `method.llm` keys; the harness builds the backend from them (`bench.llm.make_backend`)."""

    backend: str = "local"  # local | http
    model: Optional[str] = None  # local: a zoo entry (conf/model/<name>); http: the served model name
    chat_template: Optional[str] = None  # local: Jinja template for a tokenizer that has none
    base_url: Optional[str] = None  # http: e.g. http://127.0.0.1:8000/v1 (http or https only)
    api_key_env: str = "OPENAI_API_KEY"  # http: name of the env var holding the key
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256  # a constrained local answer always gets the tokens its grammar needs
    timeout_s: float = 120.0  # http: overall deadline of one chat call (retries and backoff included)
    max_retries: int = 3  # http: extra attempts after 429, 5xx or a dropped connection
    max_response_bytes: int = 1_000_000  # http: a larger response body is refused
    replay: Optional[str] = None  # a result dir or result.json: answer from its recorded calls, no LLM

    def __post_init__(self):
        check_choice("method.llm.backend", self.backend, BACKENDS)
        for key, ok, allowed in (
                ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"), ("temperature", self.temperature >= 0, ">= 0"),
                ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("timeout_s", self.timeout_s > 0, "> 0"),
                ("max_retries", self.max_retries >= 0, ">= 0"),
                ("max_response_bytes", self.max_response_bytes >= 1, ">= 1")):
            check_range(f"method.llm.{key}", getattr(self, key), ok, allowed)
        if self.base_url is not None:  # at validation, not when a cell first builds the backend
            url = urllib.parse.urlsplit(self.base_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(f"method.llm.base_url={self.base_url!r} is not an http:// or https:// URL")


class LLMError(RuntimeError):
    """A request to the LLM that produced no answer (network, HTTP status, malformed response)."""


class SearchFailed(RuntimeError):
    """The search cannot stand for what was asked: every LLM call failed (and the GA fallback was not
    allowed), or a replay diverged from its record."""


@dataclass(frozen=True)
class RatesSchema:
    """The answer's grammar, handed to the backend: `{"rates": [...]}` with exactly `n` numbers in
    [`low`, `high`]. Local backends compile `regex()` into a decoding constraint, HTTP ones send
    `json_schema()`."""

    n: int
    low: float
    high: float

    def __post_init__(self):
        if self.n < 1 or not (math.isfinite(self.low) and math.isfinite(self.high)) or not (
                0 <= self.low <= self.high):
            raise ValueError(f"RatesSchema needs n >= 1 and 0 <= low <= high; got {self}")

    @cached_property
    def decimals(self) -> int:
        """Digits after the point: 2, or more when no two-decimal value lies in [low, high]."""
        for digits in range(2, 7):
            if self._range(digits)[0] <= self._range(digits)[1]:
                return digits
        raise ValueError(f"RatesSchema: no value with at most 6 decimals lies in [{self.low}, {self.high}]")

    def _range(self, digits: int) -> tuple[int, int]:
        scale = 10 ** digits
        return math.ceil(self.low * scale - 1e-9), math.floor(self.high * scale + 1e-9)

    def values(self) -> list[str]:
        """Every allowed literal, e.g. 0.30 ... 0.70."""
        first, last = self._range(self.decimals)
        return [f"{k / 10 ** self.decimals:.{self.decimals}f}" for k in range(first, last + 1)]

    def number_regex(self) -> str:
        """A regex matching exactly `values()`: literals grouped by all but their last digit."""
        groups: dict[str, list[str]] = {}
        for literal in self.values():
            groups.setdefault(literal[:-1], []).append(literal[-1])
        parts = []
        for prefix, digits in groups.items():
            last = digits[0] if len(digits) == 1 else f"[{digits[0]}-{digits[-1]}]"
            parts.append(prefix.replace(".", r"\.") + last)
        return "(" + "|".join(parts) + ")"

    def regex(self) -> str:
        number = self.number_regex()
        repeat = f"(, {number}){{{self.n - 1}}}" if self.n > 1 else ""
        return r'\{"rates": \[' + number + repeat + r"\]\}"

    @property
    def max_chars(self) -> int:
        """Length of every answer the grammar admits (all literals have the same width)."""
        width = len(self.values()[0])
        return len('{"rates": []}') + self.n * width + (self.n - 1) * 2

    def json_schema(self) -> dict:
        return {"type": "object", "additionalProperties": False, "required": ["rates"],
                "properties": {"rates": {"type": "array", "minItems": self.n, "maxItems": self.n,
                                         "items": {"type": "number", "minimum": self.low, "maximum": self.high}}}}


class ChatLLM(Protocol):
    """What a search asks of an LLM: an answer to `messages`, sampled with `seed`, under `schema` when
    the backend can enforce it; `description` names the backend in the search's record, and
    `generated_tokens` what its last answer cost (None where the backend cannot tell)."""

    description: str
    generated_tokens: Optional[int]

    def chat(self, messages: list[dict], seed: int, schema: Optional[RatesSchema] = None) -> str: ...


def parse_rates(text: str, n: int) -> tuple[Optional[list[float]], str]:
    """(rates, "ok"|"percent") from an LLM answer, or (None, reason) with reason in
    no_json | truncated (a list of numbers cut off by max_new_tokens) | wrong_length | non_finite."""
    decoder = json.JSONDecoder()
    lists = []
    for start, char in enumerate(text):
        if char not in "[{":
            continue
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            value = value.get("rates")
        if isinstance(value, list) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            lists.append([float(v) for v in value])
    if not lists:
        tail = text[text.rfind("["):] if "[" in text else ""
        return None, "truncated" if re.fullmatch(r"\[\s*-?\d[\d.,\s-]*", tail) else "no_json"
    rates = next((values for values in lists if len(values) == n), None)
    if rates is None:
        return None, "wrong_length"
    if not all(math.isfinite(v) for v in rates):
        return None, "non_finite"
    if all(1 < v <= 100 for v in rates):
        return [v / 100 for v in rates], "percent"
    return rates, "ok"


def replayed_options(options) -> dict:
    """The options a replay must share with its record (all but the LLM's own)."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k != "llm"}


class Replay:
    """A backend answering from the calls recorded in a result: the same search, without any LLM.

    Every call must send exactly the recorded prompt and seed; the fitness values are in the prompts, so
    a replay on other code, data or hardware that scores a candidate differently stops with the call at
    which it diverged instead of quietly running a different search."""

    def __init__(self, source: str, options):
        path = Path(source).expanduser()
        path = path / RESULT_FILE if path.is_dir() else path
        try:
            record = read_result(path)
        except CorruptResult as exc:
            raise ConfigError(f"method.llm.replay={source!r} is not a readable result ({exc})") from None
        search = record.allocator.get("search") or {}
        if not search.get("calls"):
            raise ConfigError(f"method.llm.replay={source!r} holds no recorded LLM search (allocator.search.calls); "
                              f"replay needs the result of a self_pruner run that asked an LLM (operators=llm or "
                              f"init=llm)")
        recorded, current = search.get("options", {}), replayed_options(options)
        differ = [f"{k}={recorded.get(k)!r} (now {v!r})" for k, v in current.items() if recorded.get(k) != v]
        if differ:
            raise ConfigError(f"method.llm.replay={source!r} was searched with other options: {'; '.join(differ)}")
        self.calls, self.position = search["calls"], 0
        self.generated_tokens: Optional[int] = None
        self.description = f"replay of {search['llm']} from {path}"

    def chat(self, messages: list[dict], seed: int, schema: Optional[RatesSchema] = None) -> str:
        if self.position >= len(self.calls):
            raise SearchFailed(f"replay diverged: the search asks for call {self.position}, the record has "
                               f"{len(self.calls)}")
        entry = self.calls[self.position]
        self.position += 1
        if entry["messages"] != messages or entry["parameters"]["seed"] != seed:
            raise SearchFailed(f"replay diverged at call {entry['call']} ({entry['operator']}): the prompt differs "
                               f"from the recorded one (other code, data or fitness values than the record's)")
        if entry["status"] == "backend_error":
            raise LLMError(entry["answer"])
        self.generated_tokens = entry.get("generated_tokens")  # what the recorded LLM spent, not the replay
        return entry["answer"]
