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
  $population $candidate`) ask for `{"rates": [...]}`. Parsing takes the first JSON list of
  numbers of the right length found anywhere in the answer (inside `{"rates": ...}` or bare); percentages
  (all values in (1, 100]) are converted. Unusable answers (no JSON list of numbers, a list cut off by
  max_new_tokens, wrong length,
  NaN/inf, backend error) are retried `retries` times, then the classical operator stands in (origin
  `fallback_*`); each unusable answer and each repair is counted in `details["answers"]`.
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
  on the first `fitness_nsamples` calibration samples cut to `fitness_seqlen` tokens, and take the
  perplexity of the next `fitness_windows` calibration samples (same length): a held-out slice of the
  calibration text, never the evaluation split. The winner is then applied by the engine with the full
  calibration set. Deep copies (not weight snapshots) so structured pruners that remove channels
  physically work unchanged once one is available.
- The LLM: by default the model being pruned (`llm.model: ${model.name}`), dense, loaded a second time:
  for an instruct model this is the paper's "self" setting. Local sampling is seeded per call.
Structured (block-level FFN rates with channel removal, the paper's 70B->49B/35B setting) is the same
search with a structured pruner as `pruner`/`fitness_pruner`; no such pruner exists in prunebench yet.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import re
import string
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from omegaconf import MISSING
from tqdm import tqdm

from bench.config import ConfigError, SparsityPattern
from bench.llm import BACKENDS, LLMConfig, LLMError, RatesSchema, make_backend

log = logging.getLogger(__name__)

OPERATORS = ("llm", "ga")
RATE_CEILING = 0.99
MEAN_TOLERANCE = 1e-9

TEMPLATE_FIELDS = ("n_layers", "target", "min_rate", "max_rate", "population", "candidate")


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
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    clipped = bool(np.any(rates < low) or np.any(rates > high))
    rates = np.clip(rates, low, high)
    if abs(w @ rates - target) <= MEAN_TOLERANCE:
        return rates, clipped, False
    # mean(clip(rates + s)) is continuous and non-decreasing in s, from `low` to `high`: bisect for s
    lo, hi = low - rates.max(), high - rates.min()
    for _ in range(200):
        mid = (lo + hi) / 2
        if w @ np.clip(rates + mid, low, high) < target:
            lo = mid
        else:
            hi = mid
    shifted = np.clip(rates + (lo + hi) / 2, low, high)
    free = (shifted > low) & (shifted < high)
    if free.any():  # exact finish: the unclipped rates absorb the residual
        shifted[free] += (target - w @ shifted) / w[free].sum()
        shifted = np.clip(shifted, low, high)
    return shifted, clipped, True


# ----------------------------------------------------------------------------- the allocator


class _Fixed:
    """An allocator returning given rates: lets the fitness reuse `engine.prune` unchanged."""

    needs_dense_pass = False

    def __init__(self, rates: dict[str, float]):
        self.rates = rates

    def check(self, target: float, n_layers) -> None:
        pass  # the rates were repaired to the target already

    def allocate(self, sizes, target):
        return self.rates


class SelfPruner:
    needs_dense_pass = False
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
        fitness_pruner: Optional[str] = None  # None: the method's pruner
        fitness_nsamples: int = 4
        fitness_windows: int = 4
        fitness_seqlen: int = 128
        llm: LLMConfig = field(default_factory=LLMConfig)
        prompts: Prompts = field(default_factory=Prompts)

    def __init__(self, options: Options):
        from methods import PRUNERS

        o = self.options = options
        if o.llm.backend not in BACKENDS:
            raise ConfigError(f"method.llm.backend={o.llm.backend!r} is not valid; allowed: {', '.join(BACKENDS)}")
        if o.operators not in OPERATORS:
            raise ConfigError(f"method.operators={o.operators!r} is not valid; allowed: {', '.join(OPERATORS)}")
        checks = [("population", o.population >= 2, ">= 2"), ("generations", o.generations >= 0, ">= 0"),
                  ("elites", 0 <= o.elites < o.population, "0..population-1"),
                  ("mutation_prob", 0 <= o.mutation_prob <= 1, "0..1"),
                  ("mutation_sigma", o.mutation_sigma > 0, "> 0"),
                  ("max_deviation", 0 < o.max_deviation < 1, "in (0, 1)"),
                  ("cache_decimals", 1 <= o.cache_decimals <= 6, "1..6"), ("retries", o.retries >= 0, ">= 0"),
                  ("fitness_nsamples", o.fitness_nsamples >= 1, ">= 1"),
                  ("fitness_windows", o.fitness_windows >= 1, ">= 1"),
                  ("fitness_seqlen", o.fitness_seqlen >= 2, ">= 2")]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"method.{key}={getattr(o, key)!r} is out of range; allowed: {allowed}")
        if o.fitness_pruner is not None and o.fitness_pruner not in PRUNERS:
            raise ConfigError(f"method.fitness_pruner={o.fitness_pruner!r} is not valid; allowed: "
                              f"{', '.join(PRUNERS)}")
        dummy = {name: "0" for name in TEMPLATE_FIELDS}
        for key in ("system", "init", "crossover", "mutation"):
            try:
                string.Template(getattr(o.prompts, key)).substitute(dummy)
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"method.prompts.{key}: bad placeholder {exc}; allowed: "
                                  f"{', '.join('$' + f for f in TEMPLATE_FIELDS)} ($$ for a literal $)") from None
        self.llm = None  # built in bind(): loading an LLM or probing an endpoint is not config-time work
        self.context = None
        self.details: dict = {}

    def check(self, target: float, n_layers) -> None:
        pass  # any target in [0, 1): candidates are clipped to [target - d, target + d] within [0, 1)

    def bind(self, context) -> None:
        """Called by the engine before any pruning: a missing key or chat template fails here, early."""
        self.context = context
        if self.options.operators == "llm" and self.llm is None:
            self.llm = make_backend(self.options.llm)

    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        if self.context is None:
            raise RuntimeError("self_pruner needs the engine's SearchContext (bench.engine.prune binds it)")
        return _Search(self, sizes, target).run()


class _Search:
    """One evolutionary search; fills `allocator.details` and returns the best rates per linear."""

    def __init__(self, allocator: SelfPruner, sizes: dict[str, int], target: float):
        from bench.arch import arch_for

        self.o = o = allocator.options
        self.allocator, self.llm, self.ctx, self.target = allocator, allocator.llm, allocator.context, target
        arch = arch_for(self.ctx.model)
        prefixes = [f"{arch.block_name(i)}." for i in range(len(arch.blocks(self.ctx.model)))]
        self.block_of = {name: next(i for i, p in enumerate(prefixes) if name.startswith(p)) for name in sizes}
        self.weights = np.zeros(len(prefixes))
        for name, size in sizes.items():
            self.weights[self.block_of[name]] += size
        self.n = len(prefixes)
        self.low = max(0.0, target - o.max_deviation)
        self.high = min(RATE_CEILING, target + o.max_deviation)
        self.rng = np.random.default_rng(o.seed)
        self.cache: dict[tuple, float] = {}
        self.candidates: list[dict] = []
        self.answers = {"calls": 0, "usable": 0, "unusable": {}, "repairs": {}, "fallbacks": 0, "log": []}
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
        from methods import PRUNERS

        if o.fitness_pruner is None:
            self.pruner = self.ctx.pruner
        else:
            cls = PRUNERS[o.fitness_pruner]
            pattern = getattr(self.ctx.pruner, "pattern", None) or SparsityPattern("unstructured")
            self.pruner = cls(cls.Options(), pattern)

    # ------------------------------------------------------------------ fitness

    def fitness(self, rates: np.ndarray) -> tuple[float, bool]:
        key = tuple(round(float(r), self.o.cache_decimals) for r in rates)
        if key in self.cache:
            self.hits += 1
            return self.cache[key], True
        from bench import engine, evaluate
        from methods import Method

        start = time.perf_counter()
        trial = copy.deepcopy(self.ctx.model)
        per_linear = {name: float(rates[b]) for name, b in self.block_of.items()}
        # a copy of the pruner too: one that observes the dense model keeps per-model state
        engine.prune(trial, Method("fitness", _Fixed(per_linear), copy.deepcopy(self.pruner)), self.calib,
                     self.target, self.ctx.device)
        value = evaluate.perplexity(trial, self.heldout, self.ctx.device, desc="fitness ppl")
        del trial
        value = value if math.isfinite(value) else math.inf
        self.seconds["fitness"] += time.perf_counter() - start
        self.cache[key] = value
        return value, False

    def add(self, rates: np.ndarray, origin: str, generation: int, parents: Optional[list] = None) -> dict:
        value, cached = self.fitness(rates)
        candidate = {"id": len(self.candidates), "generation": generation, "origin": origin,
                     "parents": parents, "rates": [float(r) for r in rates], "fitness": value,
                     "cached": cached}
        self.candidates.append(candidate)
        return candidate

    def repaired(self, rates) -> np.ndarray:
        return repair(rates, self.weights, self.target, self.low, self.high)[0]

    # ------------------------------------------------------------------ the LLM operators

    def ask(self, operator: str, fields: dict) -> Optional[np.ndarray]:
        """Rates from the LLM for `operator`, repaired; None when every attempt was unusable."""
        o = self.o
        fields = {"n_layers": self.n, "target": f"{self.target:.4g}", "min_rate": f"{self.low:.4g}",
                  "max_rate": f"{self.high:.4g}", "population": "", "candidate": "", **fields}
        messages = [{"role": "system", "content": string.Template(o.prompts.system).substitute(fields)},
                    {"role": "user", "content": string.Template(getattr(o.prompts, operator)).substitute(fields)}]
        for _ in range(1 + o.retries):
            call = self.answers["calls"]
            self.answers["calls"] += 1
            start = time.perf_counter()
            try:
                text = self.llm.chat(messages, seed=o.seed * 1_000_003 + call,
                                     schema=RatesSchema(self.n, self.low, self.high))
                rates, status = parse_rates(text, self.n)
            except LLMError as exc:
                text, rates, status = str(exc), None, "backend_error"
            self.seconds["llm"] += time.perf_counter() - start
            entry = {"call": call, "operator": operator, "status": status, "answer": text[:300]}
            self.answers["log"].append(entry)
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
            return fixed
        self.answers["fallbacks"] += 1
        return None

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
            listing = "\n".join(f"#{c['id']} perplexity={c['fitness']:.3f} rates={_short(c['rates'])}"
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
            values = [c["fitness"] for c in population]
            finite = [v for v in values if math.isfinite(v)]
            history.append({"generation": generation, "best": min(values),
                            "mean": sum(finite) / len(finite) if finite else math.inf})
            bar.set_postfix(best=f"{min(values):.3f}", evals=len(self.cache))
        best = min(self.candidates, key=lambda c: c["fitness"])
        self.allocator.details = {"search": {
            "operators": o.operators, "llm": self.llm.description if self.llm else None,
            "population": o.population, "generations": o.generations, "elites": o.elites, "seed": o.seed,
            "bounds": [self.low, self.high], "target": self.target,
            "fitness": {"pruner": o.fitness_pruner or "method", "nsamples": o.fitness_nsamples,
                        "windows": o.fitness_windows, "seqlen": o.fitness_seqlen},
            "candidates_total": len(self.candidates), "evaluations": len(self.cache), "cache_hits": self.hits,
            "uniform_fitness": reference["fitness"], "best": best, "history": history,
            "answers": self.answers if self.llm else None,
            "seconds": {**self.seconds, "total": time.perf_counter() - started},
            "candidates": self.candidates}}
        return {name: float(best["rates"][b]) for name, b in self.block_of.items()}


def _short(rates) -> str:
    return "[" + ", ".join(f"{float(r):.2f}" for r in rates) + "]"
