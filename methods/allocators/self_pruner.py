"""Self-Pruner (Huang et al. 2025, "Towards Efficient Automatic Self-Pruning of Large Language Models",
arXiv 2502.14413): an evolutionary search over per-decoder-block pruning rates in which an LLM creates the
initial population, selects parents and performs crossover and mutation; the fitness of a candidate is
the perplexity of the model pruned with its rates. `operators: ga` swaps the LLM for a classical GA
(random init, tournament selection, uniform crossover, Gaussian mutation) with the same budget, the
ablation that shows what the LLM operators add.

The paper does not publish its prompts, population size or operator details; every choice below is
config (conf/method/self_pruner.yaml) and is ours:
- Genome: one rate per decoder block; every prunable linear of a block gets the block's rate. The paper's
  constraint (1/n) sum p_i = target becomes a *parameter-weighted* mean, identical for equal-sized blocks
  and what `sparsity` means everywhere else in prunebench. Rates live in [target - max_deviation,
  target + max_deviation], clipped to [0, 0.99] (a block is never removed whole).
- Prompts (templates in config, `string.Template` fields `$n_layers $target $min_rate $max_rate
  $population $candidate $fitness`) ask for `{"rates": [...]}`; every call also hands the backend the
  answer's grammar (`RatesSchema`): the local backend decodes under it, so every answer parses, in
  bounds; an HTTP server may or may not enforce it. Parsing takes the first JSON list of numbers of the
  right length found anywhere in the answer (inside `{"rates": ...}` or bare); percentages (all values in
  (1, 100]) are converted. Unusable answers (no JSON list of numbers, a list cut off by max_new_tokens,
  wrong length, NaN/inf, backend error) are retried `retries` times, then the classical operator stands
  in (origin `fallback_*`, and a warning in the result); each unusable answer and each repair is counted
  in `details["search"]["answers"]`, with how far the repairs moved the answers (mean and max absolute
  change per rate).
- No usable answer in the whole initial population: the LLM is not driving the search, so it stops
  (`SearchFailed`) unless `allow_fallback` lets the GA operators run on, with a warning in the result.
- Replay: every call (operator, messages, seed and sampling parameters, schema, answer, status, repairs)
  is recorded in `details["search"]["calls"]`; `llm.replay=<result dir or result.json>` answers from that
  record instead of an LLM (`Replay`) and reproduces the schedule exactly, or stops where it diverges.
- Repair: clip to the bounds, then shift all rates by one constant, re-clipping, until the weighted mean
  equals the target (bisection on the shift, then an exact closed-form step on the unclipped rates): the
  mean is exact to float precision and the bounds always hold.
- Loop: generation 0 = `population` candidates (optionally the uniform rates among them, so the search
  starts from the baseline); each later generation keeps the `elites` best and fills the rest with
  children: a crossover (the LLM sees the population with fitnesses and is asked to pick good parents and
  combine them: selection and crossover in one prompt), then, with probability `mutation_prob`, a
  mutation of that child. Only the final child is evaluated. Budget = population + generations x
  (population - elites) candidates; a candidate whose rates, rounded to `cache_decimals`, were seen
  before costs no evaluation (the cache).
- Fitness: deep-copy the dense model, prune it with `fitness_pruner` (default: the method's own pruner)
  on the first `fitness_nsamples` calibration samples cut to `fitness_seqlen` tokens, and score it on
  the next `fitness_windows` calibration samples (same length): a held-out slice of the calibration
  text, never the evaluation split. `fitness: ppl` is their perplexity (the paper's); `fitness: kl` the
  mean over tokens of KL(dense || pruned) of the next-token distributions (EvoPress's fitness), the dense
  distributions computed once per search. The winner is then applied by the engine with the full
  calibration set. Deep copies (not weight snapshots) so structured pruners that remove channels
  physically work unchanged.
- The LLM: by default the model being pruned (`llm.model: ${model.name}`), dense, loaded a second time:
  for an instruct model this is the paper's "self" setting. Local sampling is seeded per call.
Structured (block-level FFN rates with channel removal, the paper's 70B->49B/35B setting) is the same
search with a structured pruner as `pruner` (e.g. wanda_sp with selection per_block; see
conf/experiment/self_pruner_llama2.yaml).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import string
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING
from tqdm import tqdm

from bench.core import engine, perplexity
from bench.core.families import arch_for, block_of
from bench.core.records import RESULT_FILE, CorruptResult, read_result
from bench.core.vocab import ConfigError, check_choice, check_range
from methods.base import Allocator, Method
from methods.pruners import PRUNERS
from methods.rates import shift_to_mean

log = logging.getLogger(__name__)

OPERATORS = ("llm", "ga")
FITNESSES = ("ppl", "kl")
RATE_CEILING = 0.99
MEAN_TOLERANCE = 1e-9

TEMPLATE_FIELDS = ("n_layers", "target", "min_rate", "max_rate", "population", "candidate", "fitness")
FITNESS_NAMES = {"ppl": "perplexity", "kl": "KL divergence to the unpruned model"}
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


@dataclass
class Prompts:
    """The templates: data, in conf/method/self_pruner.yaml only."""

    system: str = MISSING
    init: str = MISSING
    crossover: str = MISSING
    mutation: str = MISSING


# ----------------------------------------------------------------------------- parsing and repair


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


def repair(rates, weights, target: float, low: float, high: float) -> tuple[np.ndarray, bool, bool]:
    """Clip `rates` to [low, high] and shift them so that sum(weights * rates) / sum(weights) == target.

    Returns (rates, clipped, mean_adjusted). Needs low <= target <= high.
    """
    rates = np.asarray(rates, dtype=np.float64)
    clipped = bool(np.any(rates < low) or np.any(rates > high))
    rates = np.clip(rates, low, high)
    if abs(np.dot(weights, rates) / np.sum(weights) - target) <= MEAN_TOLERANCE:
        return rates, clipped, False
    return shift_to_mean(rates, weights, target, low, high), clipped, True


# ----------------------------------------------------------------------------- the allocator


class _Fixed(Allocator):
    """An allocator returning given rates: lets the fitness reuse `engine.prune` unchanged."""

    def __init__(self, rates: dict[str, float]):
        super().__init__(None)
        self.rates = rates

    def allocate(self, sizes, target):
        return self.rates


class SelfPruner(Allocator):
    needs_search = True  # the engine calls bind(SearchContext) before allocate

    @dataclass
    class Options:
        operators: str = "llm"  # llm | ga (the classical ablation)
        seed: int = 0
        population: int = 6
        generations: int = 4  # after the initial population
        elites: int = 1
        mutation_prob: float = 0.5
        mutation_sigma: float = 0.05  # ga mutation (and fallback): Gaussian noise per rate
        max_deviation: float = 0.2  # rates in [target - d, target + d]
        seed_uniform: bool = True  # the uniform rates are one of the initial candidates
        cache_decimals: int = 3
        retries: int = 1  # extra LLM calls after an unusable answer, before the classical fallback
        allow_fallback: bool = False  # True: a search whose LLM calls all fail runs on as the GA (warned)
        fitness: str = "ppl"  # ppl | kl (mean token KL to the dense model, EvoPress's fitness)
        fitness_pruner: Optional[str] = None  # None: the method's pruner
        fitness_nsamples: int = 4
        fitness_windows: int = 4
        fitness_seqlen: int = 128
        llm: LLMConfig = field(default_factory=LLMConfig)
        prompts: Prompts = field(default_factory=Prompts)

        def __post_init__(self):
            check_choice("method.operators", self.operators, OPERATORS)
            check_choice("method.fitness", self.fitness, FITNESSES)
            for key, ok, allowed in (
                    ("population", self.population >= 2, ">= 2"), ("generations", self.generations >= 0, ">= 0"),
                    ("elites", 0 <= self.elites < self.population, "0..population-1"),
                    ("mutation_prob", 0 <= self.mutation_prob <= 1, "0..1"),
                    ("mutation_sigma", self.mutation_sigma > 0, "> 0"),
                    ("max_deviation", 0 < self.max_deviation < 1, "in (0, 1)"),
                    ("cache_decimals", 1 <= self.cache_decimals <= 6, "1..6"),
                    ("retries", self.retries >= 0, ">= 0"),
                    ("fitness_nsamples", self.fitness_nsamples >= 1, ">= 1"),
                    ("fitness_windows", self.fitness_windows >= 1, ">= 1"),
                    ("fitness_seqlen", self.fitness_seqlen >= 2, ">= 2")):
                check_range(f"method.{key}", getattr(self, key), ok, allowed)
            if self.fitness_pruner is not None:
                check_choice("method.fitness_pruner", self.fitness_pruner, PRUNERS)
            dummy = {name: "0" for name in TEMPLATE_FIELDS}
            for key in ("system", "init", "crossover", "mutation"):
                try:
                    string.Template(getattr(self.prompts, key)).substitute(dummy)
                except (KeyError, ValueError) as exc:
                    raise ConfigError(f"method.prompts.{key}: bad placeholder {exc}; allowed: "
                                      f"{', '.join('$' + f for f in TEMPLATE_FIELDS)} ($$ for a literal $)") from None

    def __init__(self, options: Options):
        super().__init__(options)
        self.llm = None  # built in bind(): loading an LLM or probing an endpoint is not config-time work
        self.context = None
        self.details: dict = {}

    def bind(self, context) -> None:
        """Called by the engine before any pruning: a missing key or chat template, an unreachable
        endpoint or an unreadable replay record fails here, early."""
        self.context = context
        if self.options.operators == "llm" and self.llm is None:
            replay = self.options.llm.replay
            self.llm = Replay(replay, self.options) if replay else context.make_llm(self.options.llm)

    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        if self.context is None:
            raise RuntimeError("self_pruner needs the engine's SearchContext (engine.prune binds it)")
        return _Search(self, sizes, target).run()

    def finish(self) -> dict:
        return self.details


def _replayed_options(options) -> dict:
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
        if search.get("operators") != "llm" or not search.get("calls"):
            raise ConfigError(f"method.llm.replay={source!r} holds no recorded LLM search (allocator.search.calls); "
                              f"replay needs the result of a self_pruner run with operators=llm")
        recorded, current = search.get("options", {}), _replayed_options(options)
        differ = [f"{k}={recorded.get(k)!r} (now {v!r})" for k, v in current.items() if recorded.get(k) != v]
        if differ:
            raise ConfigError(f"method.llm.replay={source!r} was searched with other options: {'; '.join(differ)}")
        self.calls, self.position = search["calls"], 0
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
        return entry["answer"]


class _Search:
    """One evolutionary search; fills `allocator.details` and returns the best rates per linear."""

    def __init__(self, allocator: SelfPruner, sizes: dict[str, int], target: float):
        self.o = o = allocator.options
        self.allocator, self.llm, self.ctx, self.target = allocator, allocator.llm, allocator.context, target
        arch = arch_for(self.ctx.model)
        self.n = len(arch.blocks(self.ctx.model))
        self.block_of = {name: block_of(name) for name in sizes}
        self.weights = np.zeros(self.n)
        for name, size in sizes.items():
            self.weights[self.block_of[name]] += size
        # rounded: 0.7 + 0.2 is 0.8999999999999999, which would count the grammar's own "0.90" as clipped
        self.low = round(max(0.0, target - o.max_deviation), 9)
        self.high = round(min(RATE_CEILING, target + o.max_deviation), 9)
        self.rng = np.random.default_rng(o.seed)
        self.cache: dict[tuple, float] = {}
        self.candidates: list[dict] = []
        self.budget = 1 + o.population + o.generations * (o.population - o.elites)  # with the uniform reference
        self.answers = {"calls": 0, "usable": 0, "unusable": {}, "repairs": {}, "repaired_answers": 0,
                        "repair_mean_abs_change": 0.0, "repair_max_abs_change": 0.0, "fallbacks": 0}
        self.calls: list[dict] = []  # every LLM call, enough to replay the search (`Replay`)
        self.seconds = {"llm": 0.0, "fitness": 0.0}
        self.hits = 0
        samples = self.ctx.samples
        need = o.fitness_nsamples + o.fitness_windows
        if samples.shape[0] < need or samples.shape[1] < o.fitness_seqlen:
            raise ConfigError(f"method.fitness_nsamples + fitness_windows = {need} samples of fitness_seqlen="
                              f"{o.fitness_seqlen} tokens needed; calibration has {tuple(samples.shape)} "
                              f"(raise data.calib.nsamples or lower them)")
        self.calib = samples[:o.fitness_nsamples, :o.fitness_seqlen]
        self.heldout = samples[o.fitness_nsamples:need, :o.fitness_seqlen]
        # the dense model's next-token distributions on the held-out windows, once per search
        self.dense_logp = _log_probs(self.ctx.model, self.heldout, self.ctx.device) if o.fitness == "kl" else None
        if o.fitness_pruner is None:
            self.pruner = self.ctx.pruner
        else:
            cls = PRUNERS[o.fitness_pruner]
            self.pruner = cls(cls.Options(), self.ctx.pruner.pattern)

    # ------------------------------------------------------------------ fitness

    def fitness(self, rates: np.ndarray) -> tuple[float, bool]:
        key = tuple(round(float(r), self.o.cache_decimals) for r in rates)
        if key in self.cache:
            self.hits += 1
            return self.cache[key], True
        start = time.perf_counter()
        trial = copy.deepcopy(self.ctx.model)
        per_linear = {name: float(rates[b]) for name, b in self.block_of.items()}
        # a copy of the pruner too: one that observes the dense model keeps per-model state
        engine.prune(trial, Method("fitness", _Fixed(per_linear), copy.deepcopy(self.pruner)), self.calib,
                     self.target, self.ctx.device, batch=self.ctx.batch)
        if self.dense_logp is None:
            value = perplexity.perplexity(trial, self.heldout, self.ctx.device, desc="fitness ppl")
        else:
            pruned = _log_probs(trial, self.heldout, self.ctx.device)
            value = F.kl_div(pruned, self.dense_logp, log_target=True, reduction="sum").item() / (
                pruned.shape[0] * pruned.shape[1])
        del trial
        value = value if math.isfinite(value) else math.inf
        self.seconds["fitness"] += time.perf_counter() - start
        self.cache[key] = value
        return value, False

    def add(self, rates: np.ndarray, origin: str, generation: int, parents: Optional[list] = None) -> dict:
        start = time.perf_counter()
        value, cached = self.fitness(rates)
        candidate = {"id": len(self.candidates), "generation": generation, "origin": origin,
                     "parents": parents, "rates": [float(r) for r in rates], "fitness": value,
                     "cached": cached}
        self.candidates.append(candidate)
        if self.ctx.on_candidate is not None:
            self.ctx.on_candidate(candidate["id"], self.budget, time.perf_counter() - start)
        return candidate

    def repaired(self, rates) -> np.ndarray:
        return repair(rates, self.weights, self.target, self.low, self.high)[0]

    # ------------------------------------------------------------------ the LLM operators

    def ask(self, operator: str, fields: dict) -> Optional[np.ndarray]:
        """Rates from the LLM for `operator`, repaired; None when every attempt was unusable."""
        o = self.o
        fields = {"n_layers": self.n, "target": f"{self.target:.4g}", "min_rate": f"{self.low:.4g}",
                  "max_rate": f"{self.high:.4g}", "population": "", "candidate": "",
                  "fitness": FITNESS_NAMES[o.fitness], **fields}
        messages = [{"role": "system", "content": string.Template(o.prompts.system).substitute(fields)},
                    {"role": "user", "content": string.Template(getattr(o.prompts, operator)).substitute(fields)}]
        schema = RatesSchema(self.n, self.low, self.high)
        for _ in range(1 + o.retries):
            call = self.answers["calls"]
            self.answers["calls"] += 1
            seed = o.seed * 1_000_003 + call
            start = time.perf_counter()
            try:
                text = self.llm.chat(messages, seed=seed, schema=schema)
                rates, status = parse_rates(text, self.n)
            except LLMError as exc:
                text, rates, status = str(exc), None, "backend_error"
            seconds = time.perf_counter() - start
            self.seconds["llm"] += seconds
            entry = {"call": call, "operator": operator, "messages": messages,
                     "parameters": {"seed": seed, "temperature": o.llm.temperature, "top_p": o.llm.top_p,
                                    "max_new_tokens": o.llm.max_new_tokens, "schema": [self.n, self.low, self.high]},
                     "answer": text, "status": status, "seconds": seconds}
            self.calls.append(entry)
            if rates is None:
                self._count("unusable", status)
                continue
            self.answers["usable"] += 1
            if status == "percent":
                self._count("repairs", "percent_to_fraction")
            fixed, clipped, adjusted = repair(rates, self.weights, self.target, self.low, self.high)
            for name, happened in (("clipped", clipped), ("mean_adjusted", adjusted)):
                if happened:
                    self._count("repairs", name)
            entry["repairs"] = [k for k, v in (("percent_to_fraction", status == "percent"), ("clipped", clipped),
                                               ("mean_adjusted", adjusted)) if v]
            # how far the repair moved the answer, in rate units, per block (percent->fraction is no move)
            change = np.abs(fixed - np.asarray(rates))
            entry["rates"], entry["change"] = [float(r) for r in fixed], float(change.mean())
            if clipped or adjusted:
                done = self.answers["repaired_answers"]
                self.answers["repaired_answers"] = done + 1
                self.answers["repair_mean_abs_change"] = (
                    self.answers["repair_mean_abs_change"] * done + entry["change"]) / (done + 1)
                self.answers["repair_max_abs_change"] = max(self.answers["repair_max_abs_change"], float(change.max()))
            return fixed
        self.answers["fallbacks"] += 1
        return None

    def failures(self) -> str:
        """Why no LLM call so far gave a usable answer, in one line."""
        return (f"all {self.answers['calls']} LLM calls failed ({_counts(self.answers['unusable'])}; last answer: "
                f"{' '.join(self.calls[-1]['answer'].split())[:200]!r})")

    def _count(self, group: str, key: str) -> None:
        self.answers[group][key] = self.answers[group].get(key, 0) + 1

    # ------------------------------------------------------------------ the classical operators

    def ga_init(self) -> np.ndarray:
        return self.repaired(self.rng.uniform(self.low, self.high, self.n))

    def tournament(self, population: list[dict]) -> dict:
        a, b = self.rng.choice(len(population), size=2, replace=False)
        return min(population[a], population[b], key=lambda c: c["fitness"])

    def ga_crossover(self, population: list[dict]) -> tuple[np.ndarray, list]:
        first, second = self.tournament(population), self.tournament(population)
        take = self.rng.random(self.n) < 0.5
        child = np.where(take, first["rates"], second["rates"])
        return self.repaired(child), [first["id"], second["id"]]

    def ga_mutation(self, rates: np.ndarray) -> np.ndarray:
        return self.repaired(rates + self.rng.normal(0.0, self.o.mutation_sigma, self.n))

    # ------------------------------------------------------------------ the loop

    def init(self) -> tuple[np.ndarray, str]:
        if self.llm is not None:
            rates = self.ask("init", {})
            if rates is not None:
                return rates, "llm_init"
            return self.ga_init(), "fallback_init"
        return self.ga_init(), "ga_init"

    def child(self, population: list[dict]) -> tuple[np.ndarray, str, Optional[list]]:
        parents = [c["id"] for c in population]
        if self.llm is not None:
            label, digits = ("perplexity", 3) if self.o.fitness == "ppl" else ("kl", 5)
            listing = "\n".join(f"#{c['id']} {label}={c['fitness']:.{digits}f} rates={_short(c['rates'])}"
                                for c in sorted(population, key=lambda c: c["fitness"]))
            rates = self.ask("crossover", {"population": listing})
            origin = "llm_crossover"
            if rates is None:
                rates, parents = self.ga_crossover(population)
                origin = "fallback_crossover"
        else:
            (rates, parents), origin = self.ga_crossover(population), "ga_crossover"
        if self.rng.random() < self.o.mutation_prob:
            if self.llm is not None:
                mutated = self.ask("mutation", {"candidate": _short(rates)})
                rates, origin = (mutated, "llm_mutation") if mutated is not None else (
                    self.ga_mutation(rates), "fallback_mutation")
            else:
                rates, origin = self.ga_mutation(rates), "ga_mutation"
        return rates, origin, parents

    def run(self) -> dict[str, float]:
        o = self.o
        started = time.perf_counter()
        uniform = self.repaired(np.full(self.n, self.target))
        reference = self.add(uniform, "uniform_reference", -1)
        population = []
        history = []
        bar = tqdm(range(o.generations + 1), desc=f"self_pruner[{o.operators}] generations", unit="gen")
        for generation in bar:
            if generation == 0:
                if o.seed_uniform:
                    population.append(self.add(uniform, "uniform", 0))
                while len(population) < o.population:
                    rates, origin = self.init()
                    population.append(self.add(rates, origin, 0))
            else:
                ranked = sorted(population, key=lambda c: c["fitness"])
                children = []
                for _ in range(o.population - o.elites):
                    rates, origin, parents = self.child(population)
                    children.append(self.add(rates, origin, generation, parents))
                population = ranked[:o.elites] + children
            if generation == 0 and self.llm is not None and self.answers["usable"] == 0 and not o.allow_fallback:
                raise SearchFailed(f"self_pruner: {self.failures()}; fix method.llm or set method.allow_fallback=true "
                                   f"to let the classical GA operators stand in")
            values = [c["fitness"] for c in population]
            finite = [v for v in values if math.isfinite(v)]
            history.append({"generation": generation, "best": min(values),
                            "mean": sum(finite) / len(finite) if finite else math.inf})
            bar.set_postfix(best=f"{min(values):.3f}", evals=len(self.cache))
        best = min(self.candidates, key=lambda c: c["fitness"])
        warnings = []
        if self.llm is not None and self.answers["usable"] == 0:
            warnings.append(f"self_pruner: {self.failures()}; the search ran on the classical GA operators "
                            f"(method.allow_fallback=true)")
        elif self.llm is not None and self.answers["fallbacks"]:
            warnings.append(f"self_pruner: {self.answers['fallbacks']} LLM operator calls got no usable answer "
                            f"({_counts(self.answers['unusable'])}); the classical operator stood in for them")
        for warning in warnings:
            log.warning(warning)
        self.allocator.details = {"warnings": warnings, "search": {
            "operators": o.operators, "llm": self.llm.description if self.llm else None,
            "options": _replayed_options(o),
            "population": o.population, "generations": o.generations, "elites": o.elites, "seed": o.seed,
            "bounds": [self.low, self.high], "target": self.target,
            "fitness": {"kind": o.fitness, "pruner": o.fitness_pruner or "method", "nsamples": o.fitness_nsamples,
                        "windows": o.fitness_windows, "seqlen": o.fitness_seqlen},
            "candidates_total": len(self.candidates), "evaluations": len(self.cache), "cache_hits": self.hits,
            "uniform_fitness": reference["fitness"], "best": best, "history": history,
            "answers": self.answers if self.llm else None, "calls": self.calls,
            "seconds": {**self.seconds, "total": time.perf_counter() - started},
            "candidates": self.candidates}}
        return {name: float(best["rates"][b]) for name, b in self.block_of.items()}


@torch.no_grad()
def _log_probs(model, windows: torch.Tensor, device: str) -> torch.Tensor:
    """Next-token log-probabilities (windows, seqlen, vocab), float32 on the CPU."""
    model.to(device)
    out = torch.stack([F.log_softmax(model(windows[i:i + 1].to(device), use_cache=False).logits[0].float(), -1).cpu()
                       for i in range(windows.shape[0])])
    model.to("cpu")
    return out


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _short(rates) -> str:
    return "[" + ", ".join(f"{float(r):.2f}" for r in rates) + "]"
