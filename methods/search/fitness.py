"""The fitness of candidate rates: the model pruned with them on a slice of the calibration samples,
scored on the next slice (`ppl` or `kl`; the choices are documented in `methods.allocators.self_pruner`);
and the re-score of the search's finalists on a third slice that no fitness call saw.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.core import perplexity
from bench.core.vocab import ConfigError
from methods import lifecycle, registry
from methods.base import Allocator, Method

FITNESSES = ("ppl", "kl")


class _Fixed(Allocator):
    """An allocator returning given rates: lets the fitness reuse `lifecycle.prune` unchanged."""

    def __init__(self, rates: dict[str, float]):
        super().__init__(None)
        self.rates = rates

    def allocate(self, sizes, target):
        return self.rates


class Fitness:
    """Scores per-block rates (lower is better), remembering each rounded candidate it has scored."""

    def __init__(self, context: lifecycle.SearchContext, options, block_of: dict[str, int], target: float):
        self.o = o = options
        self.ctx, self.block_of, self.target = context, block_of, target
        self.cache: dict[tuple, float] = {}
        self.hits = 0
        self.seconds = 0.0
        samples = self.ctx.samples
        scored = o.fitness_nsamples + o.fitness_windows
        need = scored + o.rescore_windows
        if samples.shape[0] < need or samples.shape[1] < o.fitness_seqlen:
            raise ConfigError(f"method.fitness_nsamples + fitness_windows + rescore_windows = {need} samples of "
                              f"fitness_seqlen={o.fitness_seqlen} tokens needed; calibration has "
                              f"{tuple(samples.shape)} (raise data.calib.nsamples or lower them)")
        self.calib = samples[:o.fitness_nsamples, :o.fitness_seqlen]
        self.heldout = samples[o.fitness_nsamples:scored, :o.fitness_seqlen]
        self.rescore_windows = samples[scored:need, :o.fitness_seqlen]
        # the dense model's next-token distributions on the scored windows, once per search
        self.dense_logp = None
        self.dense_rescore_logp = None
        if o.fitness == "kl":
            self.dense_logp = log_probs(self.ctx.model, self.heldout, self.ctx.device)
            if o.rescore_windows:
                self.dense_rescore_logp = log_probs(self.ctx.model, self.rescore_windows, self.ctx.device)
        if o.fitness_pruner is None:
            self.pruner = self.ctx.pruner
        else:
            cls = registry.pruner(o.fitness_pruner, "method.fitness_pruner")
            self.pruner = cls(cls.Options(), self.ctx.pruner.pattern)

    def key(self, rates) -> tuple:
        return tuple(round(float(r), self.o.cache_decimals) for r in rates)

    def scored(self, rates) -> bool:
        """Whether these rates (rounded to `cache_decimals`) were already scored."""
        return self.key(rates) in self.cache

    def __call__(self, rates: np.ndarray) -> tuple[float, bool]:
        """(fitness, whether it came from the cache) of one rate per block."""
        key = self.key(rates)
        if key in self.cache:
            self.hits += 1
            return self.cache[key], True
        start = time.perf_counter()
        value = self._score(rates, self.heldout, self.dense_logp)
        self.seconds += time.perf_counter() - start
        self.cache[key] = value
        return value, False

    def rescore(self, rates: np.ndarray) -> float:
        """The same score on the re-score windows: an estimate the search's own selection has not biased."""
        return self._score(rates, self.rescore_windows, self.dense_rescore_logp)

    def _score(self, rates: np.ndarray, windows: torch.Tensor, dense_logp) -> float:
        trial = copy.deepcopy(self.ctx.model)
        per_linear = {name: float(rates[b]) for name, b in self.block_of.items()}
        # a copy of the pruner too: one that observes the dense model keeps per-model state
        lifecycle.prune(trial, Method("fitness", _Fixed(per_linear), copy.deepcopy(self.pruner)), self.calib,
                        self.target, self.ctx.device, batch=self.ctx.batch)
        if dense_logp is None:
            value = perplexity.perplexity(trial, windows, self.ctx.device, desc="fitness ppl")
        else:
            pruned = log_probs(trial, windows, self.ctx.device)
            value = F.kl_div(pruned, dense_logp, log_target=True, reduction="sum").item() / (
                pruned.shape[0] * pruned.shape[1])
        del trial
        return value if math.isfinite(value) else math.inf


@torch.no_grad()
def log_probs(model, windows: torch.Tensor, device: str) -> torch.Tensor:
    """Next-token log-probabilities (windows, seqlen, vocab), float32 on the CPU."""
    model.to(device)
    out = torch.stack([F.log_softmax(model(windows[i:i + 1].to(device), use_cache=False).logits[0].float(), -1).cpu()
                       for i in range(windows.shape[0])])
    model.to("cpu")
    return out
