"""Self-Pruner's evolutionary search (the allocator, its options and the paper's choices are documented in
`methods.allocators.self_pruner`): a population of per-block rates, the LLM operators (initial
candidates, crossover, mutation, each a prompt answered under `RatesSchema`) and the classical GA ones
standing in for them, the repair that brings every candidate to the target mean within bounds, and the
loop over generations, scored by `methods.search.fitness`.
"""
from __future__ import annotations

import logging
import math
import string
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from omegaconf import MISSING
from tqdm import tqdm

from bench.core.families import arch_for, block_of
from methods.lifecycle import SearchContext
from methods.rates import shift_to_mean
from methods.search.chat import ChatLLM, LLMError, RatesSchema, SearchFailed, parse_rates, replayed_options
from methods.search.fitness import Fitness

log = logging.getLogger(__name__)

OPERATORS = ("llm", "ga")
RATE_CEILING = 0.99
MEAN_TOLERANCE = 1e-9

TEMPLATE_FIELDS = ("n_layers", "target", "min_rate", "max_rate", "population", "candidate", "fitness")
FITNESS_NAMES = {"ppl": "perplexity", "kl": "KL divergence to the unpruned model"}


@dataclass
class Prompts:
    """The templates: data, in conf/method/self_pruner.yaml only."""

    system: str = MISSING
    init: str = MISSING
    crossover: str = MISSING
    mutation: str = MISSING


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


class Search:
    """One evolutionary search over one rate per block: `run()` returns the best rates per linear and
    leaves the search's record in `details`. `llm` None: the classical GA operators alone."""

    def __init__(self, options, llm: Optional[ChatLLM], context: SearchContext, sizes: dict[str, int],
                 target: float):
        self.o = o = options
        self.llm, self.ctx, self.target = llm, context, target
        self.details: dict = {}
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
        self.candidates: list[dict] = []
        self.budget = 1 + o.population + o.generations * (o.population - o.elites)  # with the uniform reference
        self.answers = {"calls": 0, "usable": 0, "unusable": {}, "repairs": {}, "repaired_answers": 0,
                        "repair_mean_abs_change": 0.0, "repair_max_abs_change": 0.0, "fallbacks": 0}
        self.calls: list[dict] = []  # every LLM call, enough to replay the search (`Replay`)
        self.llm_seconds = 0.0
        self.fitness = Fitness(context, o, self.block_of, target)

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
            self.llm_seconds += seconds
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
            bar.set_postfix(best=f"{min(values):.3f}", evals=len(self.fitness.cache))
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
        self.details = {"warnings": warnings, "search": {
            "operators": o.operators, "llm": self.llm.description if self.llm else None,
            "options": replayed_options(o),
            "population": o.population, "generations": o.generations, "elites": o.elites, "seed": o.seed,
            "bounds": [self.low, self.high], "target": self.target,
            "fitness": {"kind": o.fitness, "pruner": o.fitness_pruner or "method", "nsamples": o.fitness_nsamples,
                        "windows": o.fitness_windows, "seqlen": o.fitness_seqlen},
            "candidates_total": len(self.candidates), "evaluations": len(self.fitness.cache),
            "cache_hits": self.fitness.hits,
            "uniform_fitness": reference["fitness"], "best": best, "history": history,
            "answers": self.answers if self.llm else None, "calls": self.calls,
            "seconds": {"llm": self.llm_seconds, "fitness": self.fitness.seconds,
                        "total": time.perf_counter() - started},
            "candidates": self.candidates}}
        return {name: float(best["rates"][b]) for name, b in self.block_of.items()}


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _short(rates) -> str:
    return "[" + ", ".join(f"{float(r):.2f}" for r in rates) + "]"
