"""The method lifecycle: what the driver (`methods.lifecycle.prune`) calls on an allocator and a pruner,
and in which order.

    Options(**keys)          each component's keys under `method.`; `__post_init__` checks each key
    check(...)               config time: a target (allocator) or pattern (pruner) it cannot reach
    observe_block(view)      only with `needs_dense_pass`: every block of the *dense* model, in order,
                             with the input statistics of `observe_level`
    dense_state() / load_dense_state(state)
                             what observe_block gathered, so the harness can cache it across cells
    bind(context)            only with `needs_search`: a `SearchContext` to score candidate rates
    search_identity(pruner)  only with `needs_search`: what the search depends on besides the model and
                             the calibration samples, so the harness can share one search across cells
    allocate(sizes, target)  allocator: {linear name: sparsity}, parameter-weighted mean = target
    finish()                 allocator: its record for the result (search history, ...), right after
                             allocate: a resumable cell stores it with the rates before pruning
    prune_block(view, rates) pruner: every block in order, with statistics of `stats_level` taken on
                             the partly pruned model (the SparseGPT protocol)

Capabilities are typed class attributes; the lifecycle and the harness read nothing else. The hooks a
component must implement are abstract methods (`allocate`; `prune_block`, or `prune_linear` /
`channel_scores` below it); the dense-pass and search hooks are needed only with their flags.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from bench.core.vocab import ConfigError, SparsityPattern


@dataclass
class NoOptions:
    """The schema of a component without keys of its own."""


class Component(ABC):
    Options: type = NoOptions
    needs_dense_pass: bool = False  # observe_block is called on every block of the dense model first
    observe_level: str = "none"  # input statistics observe_block reads: none | diag | full

    def __init__(self, options):
        self.options = options

    def observe_block(self, view) -> None:
        raise NotImplementedError(f"{type(self).__name__} sets needs_dense_pass but has no observe_block")

    def dense_state(self) -> dict:
        """What observe_block gathered (tensors, numbers, strings), restorable by `load_dense_state`."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_dense_pass but has no dense_state")

    def load_dense_state(self, state: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} sets needs_dense_pass but has no load_dense_state")


class Allocator(Component):
    """Decides the sparsity of every prunable linear."""

    needs_search: bool = False  # bind(SearchContext) is called before allocate
    # Per-block importance (higher = more important) after allocate, when the allocator computes one;
    # importance-guided recovery uses it instead of computing its own.
    block_weights: Optional[list[float]] = None

    def check(self, target: float, n_layers: Optional[int]) -> None:
        """Raise ConfigError for a target this allocator cannot reach (n_layers = prunable linears, None
        when unknown before the model loads)."""

    def check_ffn(self, target: float, widths: list[int]) -> None:
        """Raise ConfigError for FFN widths (every block's, known before the model loads) this allocator
        cannot share `target` over; called for structured pruners."""

    def check_calibration(self, nsamples: int, seqlen: int) -> None:
        """Raise ConfigError for calibration samples (count x tokens) too few or too short for this allocator."""

    def bind(self, context) -> None:
        """`context`: a `methods.lifecycle.SearchContext`."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_search but has no bind")

    def search_identity(self, pruner: "Pruner") -> tuple[dict, tuple[str, ...]]:
        """(everything the search's result depends on besides the model, the calibration samples and the
        target; the modules whose code computes it): cells with equal identities get the same rates and
        record, so the harness may run the search once for all of them."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_search but has no search_identity")

    @abstractmethod
    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        """{linear name: sparsity} for the linears of `sizes` (name -> parameter count)."""

    def finish(self) -> dict:
        """The allocator's own record for the result (empty when it has nothing to add)."""
        return {}


class Pruner(Component):
    """Removes weights inside one block, given the rates of its linears."""

    stats_level: str = "none"  # input statistics prune_block reads: none (data-free) | diag | full
    supports_nm: bool = False
    structured: bool = False  # removes FFN channels physically (the model shrinks)
    prunes: bool = True  # False only for the dense baseline
    changes_kept: bool = False  # the weights it keeps change too (a resume saves their values, not only a mask)

    def __init__(self, options, pattern: SparsityPattern):
        super().__init__(options)
        self.pattern = pattern

    @property
    def bits(self) -> Optional[int]:
        """Bits the kept weights are quantized to, None when they are not."""
        return None

    @property
    def quantizes(self) -> bool:
        return self.bits is not None

    def check(self, pattern: SparsityPattern) -> None:
        """Raise ConfigError for a sparsity pattern this pruner cannot produce with its options."""
        if pattern.kind == "nm" and not self.supports_nm:
            raise ConfigError(f"method.sparsity_type={pattern}: pruner {type(self).__name__} supports only "
                              f"unstructured")

    @abstractmethod
    def prune_block(self, view, rates: dict[str, float]) -> None:
        """Prune one block (`view`: a `bench.core.engine.BlockView`) at the rates of its linears."""


DEFAULT_TARGETS = ("Linear",)


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    """llm-compressor's rule for `targets`/`ignore`: `re:<regex>` matched (re.match) against the module's
    full name, else the full name itself or the module's class name; a subclass answers to its bases' names
    too, so `Linear` selects a family's own Linear subclass (Falcon's FalconLinear)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern in (cls.__name__ for cls in type(module).__mro__)


@dataclass
class Method:
    name: str
    allocator: Allocator
    pruner: Pruner
    targets: tuple = DEFAULT_TARGETS  # which prunable linears the method prunes; the others stay dense
    ignore: tuple = ()

    def selects(self, name: str, linear: nn.Module) -> bool:
        return (any(matches(p, name, linear) for p in self.targets)
                and not any(matches(p, name, linear) for p in self.ignore))


class LinearPruner(Pruner):
    """A pruner that decides each linear on its own, from its weight and input statistics."""

    def prune_block(self, view, rates: dict[str, float]) -> None:
        for name, linear in view.linears.items():
            if name in rates:  # a linear outside the method's targets (or ignored) has no rate: it stays dense
                self.prune_linear(linear.weight.data, view.stats.get(name), rates[name])

    @abstractmethod
    def prune_linear(self, weight, stats, sparsity: float) -> None:
        """Zero weights of one linear in place; `stats` its input statistics (None when `stats_level` is
        none)."""


class ChannelPruner(Pruner):
    """Base of structured pruners: score every FFN channel of a block, then remove the lowest-scored
    channels physically (`Arch.shrink_ffn`), so the model gets smaller and faster.

    Scores are taken on the dense model, in the lifecycle's observe-only pass (`needs_dense_pass`), as the
    CFSP/FLAP/Wanda-SP reference code does; a data-free scorer sets `needs_dense_pass = False` and is
    scored when its block is pruned. `selection = "per_block"` removes round(rate x width) channels of
    each block (rate from the allocator); `"global"` z-scores each block's channel scores and removes
    the lowest over the whole model at the allocator's mean rate (Wanda-SP/FLAP: the allocation is then
    the scores', not the allocator's).
    """

    structured = True
    needs_dense_pass = True
    observe_level = "diag"  # channel scores read the FFN output linear's input norms/means
    selection = "per_block"

    def __init__(self, options, pattern: SparsityPattern):
        super().__init__(options, pattern)
        self.scores: dict[int, torch.Tensor] = {}  # block index -> channel scores (dense model)
        self.global_removed: Optional[dict[int, torch.Tensor]] = None

    @abstractmethod
    def channel_scores(self, view) -> torch.Tensor:
        """(width,) importance of each FFN channel of the block; lower is removed first."""

    def compensate(self, view, removed: torch.Tensor) -> None:
        """Called before removal with the removed channel indices (FLAP's bias compensation)."""

    def dense_state(self) -> dict:
        return self.scores

    def load_dense_state(self, state: dict) -> None:
        self.scores = state

    def observe_block(self, view) -> None:
        self.scores[view.index] = self.channel_scores(view).float().cpu()

    @torch.no_grad()
    def prune_block(self, view, rates: dict[str, float]) -> None:
        arch = view.arch
        width = arch.ffn_width(view.block)
        rate = rates[f"{arch.block_name(view.index)}.{arch.ffn_out}"]
        if self.selection == "global":
            if self.global_removed is None:
                self.global_removed = self._global_selection(view, rates)
            removed = self.global_removed[view.index]
        else:
            scores = self.scores[view.index] if self.needs_dense_pass else self.channel_scores(view).float().cpu()
            removed = scores.topk(round(rate * width), largest=False).indices
        if removed.numel() == 0:
            return
        if removed.numel() >= width:
            raise ValueError(f"sparsity removes every FFN channel of block {view.index} ({width} channels); "
                             f"lower the sparsity")
        self.compensate(view, removed)
        keep = torch.ones(width, dtype=torch.bool)
        keep[removed] = False
        arch.shrink_ffn(view.block, keep.nonzero().squeeze(1))

    def _global_selection(self, view, rates: dict[str, float]) -> dict[int, torch.Tensor]:
        arch = view.arch
        blocks = sorted(self.scores)
        widths = [self.scores[b].numel() for b in blocks]
        removed_total = round(sum(rates[f"{arch.block_name(b)}.{arch.ffn_out}"] * w for b, w in zip(blocks, widths)))
        z = torch.cat([(s - s.mean()) / s.std() for s in (self.scores[b] for b in blocks)])
        lowest = z.topk(removed_total, largest=False).indices
        owner = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(widths))
        offsets = torch.tensor([0] + widths).cumsum(0)
        return {b: lowest[owner[lowest] == i] - offsets[i] for i, b in enumerate(blocks)}
