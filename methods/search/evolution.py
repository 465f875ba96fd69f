"""Self-Pruner's evolutionary search (the allocator, its options and the paper's choices are documented in
`methods.allocators.self_pruner`): a population of per-block rates, the LLM operators (initial
candidates, crossover, mutation, each a prompt answered under `RatesSchema`) and the classical GA ones
standing in for them, the repair that brings every candidate to the target mean within bounds, and the
loop over generations, scored by `methods.search.fitness`: every candidate after the uniform ones is a
distinct fitness evaluation, so arms with the same population, generations and elites spend the same
budget.
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

OPERATORS = ("llm", "ga", "random")
INITS = ("llm", "ga", "smooth")
OWN_INIT = {"llm": "llm", "ga": "ga", "random": "ga"}  # the initial population an arm's operators come with
RATE_CEILING = 0.99
MEAN_TOLERANCE = 1e-9
# classical mutations tried to move a candidate off the scored set before the search gives up: far more
# than a rate space rounded to `cache_decimals` ever needs unless it is nearly exhausted
MAX_DRAWS = 1000

TEMPLATE_FIELDS = ("n_layers", "target", "min_rate", "max_rate", "population", "candidate", "fitness")
FITNESS_NAMES = {"ppl": "perplexity", "kl": "KL divergence to the unpruned model"}


@dataclass
class Prompts:
    """The templates: data, in conf/method/self_pruner.yaml only."""

    system: str = MISSING
    init: str = MISSING
    crossover: str = MISSING
    mutation: str = MISSING
    duplicate: str = MISSING  # the follow-up when an answer repairs onto a scored candidate ($candidate)


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
    leaves the search's record in `details`. `llm` answers the LLM operators and the LLM init; None when
    the arm uses neither."""

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
        self.init_kind = o.init or OWN_INIT[o.operators]
        # candidates: the uniform reference, the population, the children; the seeded uniform repeats the
        # reference (a cache hit) and every other one is a distinct evaluation
        self.budget = 1 + o.population + o.generations * (o.population - o.elites)
        self.distinct_budget = self.budget - int(o.seed_uniform)
        self.duplicates: dict[str, int] = {}
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

    def ask(self, operator: str, fields: dict, duplicate: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Rates from the LLM for `operator`, repaired; None when every attempt was unusable. `duplicate`:
        the previous answer repaired onto a scored candidate, so the conversation goes on to ask for another."""
        o = self.o
        fields = {"n_layers": self.n, "target": f"{self.target:.4g}", "min_rate": f"{self.low:.4g}",
                  "max_rate": f"{self.high:.4g}", "population": "", "candidate": "",
                  "fitness": FITNESS_NAMES[o.fitness], **fields}
        messages = [{"role": "system", "content": string.Template(o.prompts.system).substitute(fields)},
                    {"role": "user", "content": string.Template(getattr(o.prompts, operator)).substitute(fields)}]
        if duplicate is not None:
            again = string.Template(o.prompts.duplicate).substitute({**fields, "candidate": _short(duplicate)})
            messages += [{"role": "assistant", "content": '{"rates": ' + _short(duplicate) + "}"},
                         {"role": "user", "content": again}]
        schema = RatesSchema(self.n, self.low, self.high)
        for _ in range(1 + o.retries):
            call = self.answers["calls"]
            self.answers["calls"] += 1
            seed = o.seed * 1_000_003 + call
            start = time.perf_counter()
            try:
                text = self.llm.chat(messages, seed=seed, schema=schema)
                rates, status = parse_rates(text, self.n)
                generated = self.llm.generated_tokens
            except LLMError as exc:
                text, rates, status, generated = str(exc), None, "backend_error", None
            seconds = time.perf_counter() - start
            self.llm_seconds += seconds
            entry = {"call": call, "operator": operator, "reask": duplicate is not None, "messages": messages,
                     "parameters": {"seed": seed, "temperature": o.llm.temperature, "top_p": o.llm.top_p,
                                    "max_new_tokens": o.llm.max_new_tokens, "schema": [self.n, self.low, self.high]},
                     "answer": text, "status": status, "seconds": seconds, "generated_tokens": generated}
            self.calls.append(entry)
            if rates is None:
                self._count("unusable", status)
                continue
            self.answers["usable"] += 1
            if status == "percent":
                self._count("repairs", "percent_to_fraction")
            # not a rate at all (1.7, -0.4), unlike one the band leaves out: both are clipped, only this is nonsense
            outside = any(not 0 <= rate <= 1 for rate in rates)
            if outside:
                self._count("repairs", "out_of_domain")
            fixed, clipped, adjusted = repair(rates, self.weights, self.target, self.low, self.high)
            for name, happened in (("clipped", clipped), ("mean_adjusted", adjusted)):
                if happened:
                    self._count("repairs", name)
            entry["repairs"] = [k for k, v in (("percent_to_fraction", status == "percent"), ("out_of_domain", outside),
                                               ("clipped", clipped), ("mean_adjusted", adjusted)) if v]
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

    def smooth_init(self) -> np.ndarray:
        """A schedule of the kind heuristics propose: a ramp over depth (either direction, any slope within
        the bounds) or the uniform rates, each plus small per-block noise."""
        base = np.full(self.n, self.target)
        if self.rng.random() < 0.5:
            base = base + self.rng.uniform(-1.0, 1.0) * self.o.max_deviation * np.linspace(-1.0, 1.0, self.n)
        return self.repaired(base + self.rng.normal(0.0, self.o.mutation_sigma / 2, self.n))

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

    def init(self, population: list[dict], duplicate: Optional[np.ndarray]) -> tuple[np.ndarray, str, None]:
        if self.init_kind == "llm":
            # the paper asks for a population of distinct schedules: each call sees the ones already in it
            listing = "\n".join(_short(c["rates"]) for c in population) or "(none yet)"
            rates = self.ask("init", {"population": listing}, duplicate)
            if rates is not None:
                return rates, "llm_init", None
            return self.ga_init(), "fallback_init", None
        if self.init_kind == "smooth":
            return self.smooth_init(), "smooth_init", None
        return self.ga_init(), "ga_init", None

    def child(self, population: list[dict], duplicate: Optional[np.ndarray]) -> tuple[np.ndarray, str, Optional[list]]:
        parents = [c["id"] for c in population]
        if self.o.operators == "random":
            return self.ga_init(), "random", None
        if self.o.operators == "llm":
            label, digits = ("perplexity", 3) if self.o.fitness == "ppl" else ("kl", 5)
            listing = "\n".join(f"#{c['id']} {label}={c['fitness']:.{digits}f} rates={_short(c['rates'])}"
                                for c in sorted(population, key=lambda c: c["fitness"]))
            rates = self.ask("crossover", {"population": listing}, duplicate)
            origin = "llm_crossover"
            if rates is None:
                rates, parents = self.ga_crossover(population)
                origin = "fallback_crossover"
        else:
            (rates, parents), origin = self.ga_crossover(population), "ga_crossover"
        if self.rng.random() < self.o.mutation_prob:
            if self.o.operators == "llm":
                mutated = self.ask("mutation", {"candidate": _short(rates)}, duplicate)
                rates, origin = (mutated, "llm_mutation") if mutated is not None else (
                    self.ga_mutation(rates), "fallback_mutation")
            else:
                rates, origin = self.ga_mutation(rates), "ga_mutation"
        return rates, origin, parents

    def fresh(self, propose) -> tuple[np.ndarray, str, Optional[list]]:
        """A candidate no fitness call has scored yet. `propose(duplicate)` is asked again, at most `reasks`
        times, while its rates repair onto a scored candidate (each such answer counted as a duplicate of
        its origin); then the classical mutation moves the last one off the scored set. Without this a
        constant answer would cost nothing and an arm would spend fewer evaluations than another."""
        duplicate = None
        for _ in range(1 + self.o.reasks):
            rates, origin, parents = propose(duplicate)
            if not self.fitness.scored(rates):
                return rates, origin, parents
            self.duplicates[origin] = self.duplicates.get(origin, 0) + 1
            duplicate = rates
        for _ in range(MAX_DRAWS):
            rates = self.ga_mutation(rates)
            if not self.fitness.scored(rates):
                return rates, "duplicate_mutation", parents
        raise SearchFailed(f"self_pruner: no unscored candidate found in {MAX_DRAWS} mutations: the rate space "
                           f"rounded to method.cache_decimals={self.o.cache_decimals} is nearly exhausted "
                           f"(raise it or lower the budget)")

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
                    rates, origin, _ = self.fresh(lambda duplicate: self.init(population, duplicate))
                    population.append(self.add(rates, origin, 0))
            else:
                ranked = sorted(population, key=lambda c: c["fitness"])
                children = []
                for _ in range(o.population - o.elites):
                    rates, origin, parents = self.fresh(lambda duplicate: self.child(population, duplicate))
                    children.append(self.add(rates, origin, generation, parents))
                population = ranked[:o.elites] + children
            if self.llm is not None and self.answers["calls"] and not self.answers["usable"] and not o.allow_fallback:
                raise SearchFailed(f"self_pruner: {self.failures()}; fix method.llm or set method.allow_fallback=true "
                                   f"to let the classical GA operators stand in")
            values = [c["fitness"] for c in population]
            finite = [v for v in values if math.isfinite(v)]
            history.append({"generation": generation, "best": min(values),
                            "mean": sum(finite) / len(finite) if finite else math.inf,
                            "diversity": diversity([c["rates"] for c in population])})
            bar.set_postfix(best=f"{min(values):.3f}", evals=len(self.fitness.cache))
        best, rescore = self.pick()
        warnings = []
        if self.llm is not None and self.answers["calls"] and not self.answers["usable"]:
            warnings.append(f"self_pruner: {self.failures()}; the search ran on the classical GA operators "
                            f"(method.allow_fallback=true)")
        elif self.llm is not None and self.answers["fallbacks"]:
            warnings.append(f"self_pruner: {self.answers['fallbacks']} LLM operator calls got no usable answer "
                            f"({_counts(self.answers['unusable'])}); the classical operator stood in for them")
        for warning in warnings:
            log.warning(warning)
        self.details = {"warnings": warnings, "search": {
            "operators": o.operators, "init": self.init_kind, "llm": self.llm.description if self.llm else None,
            "options": replayed_options(o),
            "population": o.population, "generations": o.generations, "elites": o.elites, "seed": o.seed,
            "bounds": [self.low, self.high], "target": self.target,
            "fitness": {"kind": o.fitness, "pruner": o.fitness_pruner or "method", "nsamples": o.fitness_nsamples,
                        "windows": o.fitness_windows, "seqlen": o.fitness_seqlen},
            "candidates_total": len(self.candidates), "budget": self.distinct_budget,
            "evaluations": len(self.fitness.cache), "tokens_scored": len(self.fitness.cache) * o.fitness_windows
            * o.fitness_seqlen, "duplicates": sum(self.duplicates.values()), "duplicates_by_origin": self.duplicates,
            "cache_hits": self.fitness.hits, "llm_tokens": self._llm_tokens(),
            "uniform_fitness": reference["fitness"], "best": best, "rescore": rescore, "history": history,
            "answers": self.answers if self.llm else None, "calls": self.calls,
            "seconds": {"llm": self.llm_seconds, "fitness": self.fitness.seconds,
                        "total": time.perf_counter() - started},
            "candidates": self.candidates}}
        return {name: float(best["rates"][b]) for name, b in self.block_of.items()}

    def _llm_tokens(self) -> Optional[int]:
        """The tokens of the LLM's answers over the search (0 without calls; a call that got no answer counts
        none); None when the backend could not tell for some answer, since a partial sum would understate
        the cost."""
        counts = [call["generated_tokens"] for call in self.calls if call["status"] != "backend_error"]
        return None if None in counts else sum(counts)

    def pick(self) -> tuple[dict, Optional[dict]]:
        """The winner: the best fitness, or with `rescore_windows` the best of the `rescore_top` best distinct
        candidates on windows no fitness call saw (the minimum of many noisy scores flatters its winner)."""
        best = min(self.candidates, key=lambda c: c["fitness"])
        if not self.o.rescore_windows:
            return best, None
        finalists = []
        for candidate in sorted(self.candidates, key=lambda c: c["fitness"]):
            if not candidate["cached"] and len(finalists) < self.o.rescore_top:
                finalists.append({"id": candidate["id"], "fitness": candidate["fitness"],
                                  "rescore": self.fitness.rescore(np.asarray(candidate["rates"]))})
        picked = min(finalists, key=lambda f: f["rescore"])
        return self.candidates[picked["id"]], {"windows": self.o.rescore_windows, "finalists": finalists,
                                               "picked": picked["id"], "fitness_best": best["id"]}


def diversity(population: list) -> float:
    """Mean over pairs of candidates of their mean absolute rate difference per block (rate units)."""
    rates = np.asarray(population, dtype=np.float64)
    if len(rates) < 2:
        return 0.0
    gaps = np.abs(rates[:, None, :] - rates[None, :, :]).mean(axis=2)
    return float(gaps[np.triu_indices(len(rates), 1)].mean())


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _short(rates) -> str:
    return "[" + ", ".join(f"{float(r):.2f}" for r in rates) + "]"
