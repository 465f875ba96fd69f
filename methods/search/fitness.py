"""The fitness of candidate rates: the model pruned with them on a slice of the calibration samples,
scored on the next slice (`ppl` or `kl`; the choices are documented in `methods.allocators.self_pruner`);
and the re-score of the search's finalists on a third slice that no fitness call saw.

A candidate never copies the model (at 70B a copy per candidate is 128 GiB beside the model): the dense
model's own blocks are pruned one at a time, the scored windows go through each pruned block as the walk
leaves it, and the block's dense copy is put back (`_Trial`). So a candidate costs one block beside the
model, on the host and on the device, and the model is dense again when it is scored.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.core import engine, perplexity
from bench.core.families import arch_for
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


def check_samples(options, nsamples: int, seqlen: int) -> None:
    """The search prunes on, scores on and re-scores on disjoint calibration samples of fitness_seqlen tokens."""
    need = options.fitness_nsamples + options.fitness_windows + options.rescore_windows
    if nsamples < need or seqlen < options.fitness_seqlen:
        raise ConfigError(f"method.fitness_nsamples + fitness_windows + rescore_windows = {need} samples of "
                          f"fitness_seqlen={options.fitness_seqlen} tokens needed; calibration has {nsamples} x "
                          f"{seqlen} (data.calib.nsamples x data.calib.seqlen); allowed: raise those or lower these")


class Fitness:
    """Scores per-block rates (lower is better), remembering each rounded candidate it has scored."""

    def __init__(self, context: lifecycle.SearchContext, options, block_of: dict[str, int], target: float):
        self.o = o = options
        self.ctx, self.block_of, self.target = context, block_of, target
        self.cache: dict[tuple, float] = {}
        self.hits = 0
        # what an interrupted run of this search scored: replayed, the same choices reach the same candidates
        self.restored = dict(context.scores.scored()) if context.scores is not None else {}
        self.seconds = 0.0
        samples = self.ctx.samples
        check_samples(o, *samples.shape)
        scored = o.fitness_nsamples + o.fitness_windows
        need = scored + o.rescore_windows
        self.calib = samples[:o.fitness_nsamples, :o.fitness_seqlen]
        self.heldout = samples[o.fitness_nsamples:scored, :o.fitness_seqlen]
        self.rescore_windows = samples[scored:need, :o.fitness_seqlen]
        self.inputs: dict[int, tuple] = {}  # id of a window set -> its block-0 inputs and per-block kwargs
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
        if key in self.restored:  # a distinct evaluation all the same: the record is the uninterrupted one's
            value = self.restored[key]
        else:
            start = time.perf_counter()
            value = self._score(rates, self.heldout, self.dense_logp)
            self.seconds += time.perf_counter() - start
            if self.ctx.scores is not None:
                self.ctx.scores.save_score(key, value)
        self.cache[key] = value
        return value, False

    def rescore(self, rates: np.ndarray) -> float:
        """The same score on the re-score windows: an estimate the search's own selection has not biased."""
        return self._score(rates, self.rescore_windows, self.dense_rescore_logp)

    def _score(self, rates: np.ndarray, windows: torch.Tensor, dense_logp) -> float:
        model, device = self.ctx.model, self.ctx.device
        if id(windows) not in self.inputs:  # they depend on the windows alone, not on any pruning
            hidden, kwargs = engine.capture_inputs(model, windows, device)
            self.inputs[id(windows)] = hidden, engine.to_device(kwargs, device, {})
        trial = _Trial(model, *self.inputs[id(windows)], device)
        per_linear = {name: float(rates[b]) for name, b in self.block_of.items()}
        # a copy of the pruner too: one that observes the dense model keeps per-model state
        lifecycle.prune(model, Method("fitness", _Fixed(per_linear), copy.deepcopy(self.pruner)), self.calib,
                        self.target, device, batch=self.ctx.batch, stream=trial)
        logits = perplexity.head_logits(model, windows, trial.hidden, trial.as_tuple, device)
        if dense_logp is None:
            value = perplexity.from_nlls(torch.tensor(
                [perplexity.window_nll(each, windows[row:row + 1].to(device)) for row, each in enumerate(logits)],
                dtype=torch.float64))
        else:
            pruned = torch.stack([F.log_softmax(each[0].float(), -1).cpu() for each in logits])
            value = F.kl_div(pruned, dense_logp, log_target=True, reduction="sum").item() / (
                pruned.shape[0] * pruned.shape[1])
        return value if math.isfinite(value) else math.inf


class _Trial:
    """The `engine.Stream` of a candidate's prune over the dense model's own blocks: `load` keeps a dense
    copy of the block the walk reaches; `release` of a pruned block runs the scored windows' hidden states
    through it, then copies the dense weights back into it (or, when pruning reshaped it, puts the dense
    copy in its place). A block that was only observed stays as it is."""

    def __init__(self, model, hidden: torch.Tensor, kwargs: list, device: str):
        self.blocks = arch_for(model).blocks(model)
        self.hidden, self.kwargs, self.device = hidden, kwargs, device
        self.as_tuple = False
        self.dense = None

    def load(self, index: int, block) -> None:
        self.dense = copy.deepcopy(block)

    def release(self, index: int, block, edited: bool) -> None:
        if edited:
            self.hidden, self.as_tuple = engine.run_block_form(block.to(self.device), self.hidden, self.kwargs[index],
                                                               self.device)
            block.to("cpu")
            # Written into the block's own tensors: swapping in the dense copy leaked a model per search, since
            # loaded weights are views of the checkpoint's private file mapping, which lives as long as any of
            # them (the embeddings), so the pages pruning wrote stayed resident after their block was dropped
            # (SmolLM2: 1.67 GiB peak RSS where the plan said 1.13). A reshaped block is swapped whole.
            if _reshaped(block, self.dense):
                self.blocks[index] = self.dense
            else:
                with torch.no_grad():
                    block.load_state_dict(self.dense.state_dict())
        self.dense = None


def _reshaped(block: nn.Module, dense: nn.Module) -> bool:
    """Whether pruning changed a linear's shape (structured) or gave it a bias (FLAP)."""
    return any(module.weight.shape != block.get_submodule(name).weight.shape
               or (module.bias is None) != (block.get_submodule(name).bias is None)
               for name, module in dense.named_modules() if isinstance(module, nn.Linear))


@torch.no_grad()
def log_probs(model, windows: torch.Tensor, device: str) -> torch.Tensor:
    """Next-token log-probabilities (windows, seqlen, vocab), float32 on the CPU."""
    model.to(device)
    out = torch.stack([F.log_softmax(model(windows[i:i + 1].to(device), use_cache=False).logits[0].float(), -1).cpu()
                       for i in range(windows.shape[0])])
    model.to("cpu")
    return out
