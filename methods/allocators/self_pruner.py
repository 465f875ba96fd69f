"""Self-Pruner (Huang et al. 2025, "Towards Efficient Automatic Self-Pruning of Large Language Models",
arXiv 2502.14413): an evolutionary search over per-decoder-block pruning rates in which an LLM creates the
initial population, selects parents and performs crossover and mutation; the fitness of a candidate is
the perplexity of the model pruned with its rates. `operators: ga` swaps the LLM for a classical GA
(random init, tournament selection, uniform crossover, Gaussian mutation) with the same budget, the
ablation that shows what the LLM operators add; `operators: random` draws every candidate afresh (random
search). `init` separates an arm's prior from its operators: the initial population comes from the LLM,
from the GA's independent draws, or from `smooth` schedules (ramps over depth or the uniform rates, plus
small noise), whatever operators breed it.

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
  starts from the baseline); the paper's initial prompt asks for distinct candidates, ours is asked once
  per candidate with the schedules already in the population listed (one answer per call keeps the
  grammar of a single schedule); each later generation keeps the `elites` best and fills the rest with
  children: a crossover (the LLM sees the population with fitnesses and is asked to pick good parents and
  combine them: selection and crossover in one prompt), then, with probability `mutation_prob`, a
  mutation of that child. Only the final child is evaluated.
- Budget = distinct fitness evaluations, the same for every arm: 1 (the uniform reference) + population
  + generations x (population - elites) candidates, less the seeded uniform (a repeat of the reference).
  A candidate whose repaired rates, rounded to `cache_decimals`, were scored before is a duplicate: its
  operator is asked again (the LLM in the same conversation, told the schedule was scored; the GA draws
  again), at most `reasks` times, then the classical mutation moves it off the scored set. Without this a
  constant LLM answer (every rate 0.50 repairs onto the uniform schedule) cost nothing, and the LLM arm
  spent a fraction of the GA's evaluations. The record keeps `budget`, `evaluations` (distinct),
  `duplicates` (per origin), `cache_hits` and each generation's `diversity` (mean pairwise mean absolute
  rate difference).
- Winner: the lowest fitness, the minimum of many noisy scores on few tokens and so flattered; with
  `rescore_windows` the `rescore_top` best distinct candidates are scored again on the calibration
  samples after the fitness's (seen by no fitness call) and that score picks the winner
  (`details["search"]["rescore"]` keeps both scores of every finalist).
- Fitness: deep-copy the dense model, prune it with `fitness_pruner` (default: the method's own pruner)
  on the first `fitness_nsamples` calibration samples cut to `fitness_seqlen` tokens, and score it on
  the next `fitness_windows` calibration samples (same length): a held-out slice of the calibration
  text, never the evaluation split. `fitness: ppl` is their perplexity (the paper's); `fitness: kl` the
  mean over tokens of KL(dense || pruned) of the next-token distributions (EvoPress's fitness), the dense
  distributions computed once per search. The winner is then applied by the lifecycle with the full
  calibration set. Deep copies (not weight snapshots) so structured pruners that remove channels
  physically work unchanged.
- The LLM: by default the model being pruned (`llm.model: ${model.name}`), dense, loaded a second time:
  for an instruct model this is the paper's "self" setting. Local sampling is seeded per call.
Structured (block-level FFN rates with channel removal, the paper's 70B->49B/35B setting) is the same
search with a structured pruner as `pruner` (e.g. wanda_sp with selection per_block; see
conf/experiment/self_pruner_llama2.yaml).
"""
from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from typing import Optional

from bench.core.vocab import ConfigError, check_choice, check_range
from methods import registry
from methods.base import Allocator, Pruner
from methods.lifecycle import SearchContext
from methods.registry import register_allocator
from methods.search.chat import ChatLLM, LLMConfig, Replay
from methods.search.evolution import INITS, OPERATORS, TEMPLATE_FIELDS, Prompts, Search
from methods.search.fitness import FITNESSES, check_samples


@register_allocator("self_pruner")
class SelfPruner(Allocator):
    needs_search = True  # the lifecycle calls bind(SearchContext) before allocate

    @dataclass
    class Options:
        operators: str = "llm"  # llm | ga (the classical ablation) | random (random search)
        init: Optional[str] = None  # llm | ga | smooth; None: the operators' own (random search: ga)
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
        reasks: int = 3  # extra proposals after one that repairs onto a scored candidate
        allow_fallback: bool = False  # True: a search whose LLM calls all fail runs on as the GA (warned)
        fitness: str = "ppl"  # ppl | kl (mean token KL to the dense model, EvoPress's fitness)
        fitness_pruner: Optional[str] = None  # None: the method's pruner
        fitness_nsamples: int = 4
        fitness_windows: int = 4
        fitness_seqlen: int = 128
        rescore_windows: int = 0  # 0: the lowest fitness wins; else the finalists' score on these next samples
        rescore_top: int = 3  # finalists re-scored
        llm: LLMConfig = field(default_factory=LLMConfig)
        prompts: Prompts = field(default_factory=Prompts)

        def __post_init__(self):
            check_choice("method.operators", self.operators, OPERATORS)
            if self.init is not None:
                check_choice("method.init", self.init, INITS)
            check_choice("method.fitness", self.fitness, FITNESSES)
            for key, ok, allowed in (
                    ("population", self.population >= 2, ">= 2"), ("generations", self.generations >= 0, ">= 0"),
                    ("elites", 0 <= self.elites < self.population, "0..population-1"),
                    ("mutation_prob", 0 <= self.mutation_prob <= 1, "0..1"),
                    ("mutation_sigma", self.mutation_sigma > 0, "> 0"),
                    ("max_deviation", 0 < self.max_deviation < 1, "in (0, 1)"),
                    ("cache_decimals", 1 <= self.cache_decimals <= 6, "1..6"),
                    ("retries", self.retries >= 0, ">= 0"), ("reasks", self.reasks >= 0, ">= 0"),
                    ("rescore_windows", self.rescore_windows >= 0, ">= 0"), ("rescore_top", self.rescore_top >= 1, ">= 1"),
                    ("fitness_nsamples", self.fitness_nsamples >= 1, ">= 1"),
                    ("fitness_windows", self.fitness_windows >= 1, ">= 1"),
                    ("fitness_seqlen", self.fitness_seqlen >= 2, ">= 2")):
                check_range(f"method.{key}", getattr(self, key), ok, allowed)
            if self.fitness_pruner is not None:
                registry.pruner(self.fitness_pruner, "method.fitness_pruner")
            dummy = {name: "0" for name in TEMPLATE_FIELDS}
            for key in ("system", "init", "crossover", "mutation", "duplicate"):
                try:
                    string.Template(getattr(self.prompts, key)).substitute(dummy)
                except (KeyError, ValueError) as exc:
                    raise ConfigError(f"method.prompts.{key}: bad placeholder {exc}; allowed: "
                                      f"{', '.join('$' + f for f in TEMPLATE_FIELDS)} ($$ for a literal $)") from None

    def __init__(self, options: Options):
        super().__init__(options)
        # built in bind(): loading an LLM or probing an endpoint is not config-time work
        self.llm: Optional[ChatLLM] = None
        self.context: Optional[SearchContext] = None
        self.details: dict = {}

    def check_calibration(self, nsamples: int, seqlen: int) -> None:
        check_samples(self.options, nsamples, seqlen)

    def bind(self, context: SearchContext) -> None:
        """Called by the lifecycle before any pruning: a missing key or chat template, an unreachable
        endpoint or an unreadable replay record fails here, early."""
        self.context = context
        if "llm" in (self.options.operators, self.options.init) and self.llm is None:
            replay = self.options.llm.replay
            self.llm = Replay(replay, self.options) if replay else context.make_llm(self.options.llm)

    def search_identity(self, pruner: Pruner) -> tuple[dict, tuple[str, ...]]:
        # The fitness pruner, not the cell's: with fitness_pruner=wanda a Wanda and a SparseGPT cell run the
        # same search, which the allocator league's two columns then share.
        if self.options.fitness_pruner is None:
            fitness = type(pruner), pruner.options
        else:  # built with its default options (methods.search.fitness)
            cls = registry.PRUNERS[self.options.fitness_pruner]
            fitness = cls, cls.Options()
        options = dataclasses.asdict(self.options)
        del options["fitness_pruner"]  # None and the name of the method's own pruner search alike
        identity = {"options": options, "fitness_pruner": [fitness[0].__name__, dataclasses.asdict(fitness[1])],
                    "pattern": str(pruner.pattern)}
        modules = (__name__, fitness[0].__module__, "methods.search.chat", "methods.search.evolution",
                   "methods.search.fitness")
        return identity, modules

    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        if self.context is None:
            raise RuntimeError("self_pruner needs the lifecycle's SearchContext (lifecycle.prune binds it)")
        search = Search(self.options, self.llm, self.context, sizes, target)
        rates = search.run()
        self.details = search.details
        return rates

    def finish(self) -> dict:
        return self.details
