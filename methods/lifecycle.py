"""The driver of the method lifecycle (`methods.base`): `prune` runs an allocator and a pruner over a
model the same way for every method, on the block walk of `bench.core.engine`.

What it needs from the harness comes in as typed collaborators: a `CellCache` (block 0's inputs and the
components' dense state across cells), a `Stream` (blocks read from and written to disk), a
`ResumeStore` (an interrupted pass goes on where it stopped) and a `MakeLLM` (the chat LLM of a search).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from bench.core.engine import Block0Cache, BlockView, OnBlock, OnStep, Stream, traverse, walk
from bench.core.families import arch_for, prunable_linears
from bench.core.vocab import STATS_LEVELS, ConfigError
from methods.base import Method, Pruner
from methods.search.chat import ChatLLM, LLMConfig

log = logging.getLogger(__name__)

# The harness builds the chat LLM of an LLM-driven search from its options (it knows how to load models
# and reach endpoints).
MakeLLM = Callable[[LLMConfig], ChatLLM]


class CellCache(Block0Cache, Protocol):
    """Block 0's inputs, and what the dense pass gathered (`Component.dense_state`, in the order of the
    observing components), both kept across cells; `compute()` gives a value the cache does not hold."""

    def dense_state(self, samples: torch.Tensor, stats_level: str, batch: int,
                    compute: Callable[[], list[dict]]) -> list[dict]: ...

    def search(self, samples: torch.Tensor, target: float, device: str, batch: int, identity: dict,
               modules: tuple[str, ...], compute: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict]: ...


@dataclass
class SearchContext:
    """Given to an allocator with `needs_search` (via `bind`) before `allocate`: it scores candidate
    allocations by pruning copies of the still-dense `model` with `pruner` on `samples`."""

    model: nn.Module
    samples: torch.Tensor
    pruner: Pruner
    device: str
    make_llm: Optional[MakeLLM] = None
    batch: int = 1  # calibration samples per block forward, for the candidates' prunes
    on_candidate: OnBlock = None  # (index, budget, seconds) per scored candidate
    scores: Optional["SearchScores"] = None  # fitness values an interrupted search already computed


class SearchScores(Protocol):
    """Where a search's scored candidates outlive the process (e.g. `bench.resume.ResumeState`): a requeued
    search replays its choices and takes each fitness value it finds here instead of pruning again."""

    def scored(self) -> dict[tuple, float]: ...

    def save_score(self, key: tuple, value: float) -> None: ...


@dataclass
class Allocation:
    """What the pruning pass takes from the phase before it (dense pass, search, allocate): a resumable
    cell stores it, so a resumed pass skips that phase."""

    rates: dict[str, float]
    details: dict  # the allocator's record (`Allocator.finish`)
    block_weights: Optional[list[float]]  # `Allocator.block_weights`
    pruner_state: Optional[dict]  # the pruner's `dense_state()`, when it makes a dense pass
    seconds: dict[str, float]  # wall time of the phase's stages


@dataclass
class ResumePoint:
    """Where an interrupted pruning pass stopped: blocks before `next_block` are pruned (their states are
    with the resume store), `inputs` feed `next_block` (None: capture them, as a fresh pass does)."""

    allocation: Allocation
    next_block: int
    inputs: Optional[torch.Tensor]


class ResumeStore(SearchScores, Protocol):
    """Makes a pruning pass resumable (e.g. the harness's `bench.resume.ResumeState`): it is handed each
    candidate a search scores, the allocation before block 0, every block before it is pruned (so it may
    keep only what pruning changed) and once pruned, with the next block's inputs (None after the last);
    `load()` returns where an earlier pass stopped, None for a fresh pass, and `block(index, dense)` a pruned
    block's state given its dense state."""

    def load(self) -> Optional[ResumePoint]: ...

    def block(self, index: int, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def dense_block(self, index: int, block: nn.Module) -> None: ...

    def save_allocation(self, allocation: Allocation) -> None: ...

    def save_block(self, index: int, block: nn.Module, next_inputs: Optional[torch.Tensor]) -> None: ...


@dataclass
class PruneReport:
    rates: dict[str, float]  # the allocated sparsity of every prunable linear
    seconds: dict[str, float]  # wall time per stage
    details: dict = field(default_factory=dict)  # the allocator's own record (`Allocator.finish`)
    resumed_from: Optional[int] = None  # the block an interrupted pass was resumed at


# The passes of `prune` that report each finished step to its `on_step` callback, and what a step is.
PRUNE_STEPS = {"dense_statistics": "block", "search": "candidate", "prune": "block"}


def prune(model: nn.Module, method: Method, samples: torch.Tensor, sparsity: float, device: str,
          cache: Optional[CellCache] = None, stream: Optional[Stream] = None, make_llm: Optional[MakeLLM] = None,
          on_step: OnStep = None, batch: int = 1, resume: Optional[ResumeStore] = None) -> PruneReport:
    """Apply `method` (allocator x pruner, see `methods.base` for the lifecycle) to `model` in place at
    mean target `sparsity`.

    Lifecycle: `allocator.check` with the real layer count; one observe-only pass over the dense model
    for every component with `needs_dense_pass` (`observe_block`; with a `cache` its `dense_state` may
    come from disk instead); `allocator.bind` for searches; `allocator.allocate`; `allocator.finish` for
    the record; `pruner.prune_block` on every block. With a `stream`, blocks live on the meta device
    until the walk reaches them (see `bench.core.engine.traverse`). `on_step(pass, index, total, seconds)`
    hears of every step of the passes `PRUNE_STEPS` while they run (a search's steps are its scored
    candidates, reported by the allocator through `SearchContext.on_candidate`); `batch` calibration
    samples go through a block at once. With a `resume` store whose `load()` returns a `ResumePoint`,
    the allocation phase is skipped (searches included), the pruned blocks it holds are loaded and the
    pass goes on from there."""
    if resume is not None and stream is not None:
        raise ValueError("a streamed pass cannot be resumed: its blocks are written to the output checkpoint")
    arch = arch_for(model)
    blocks = arch.blocks(model)
    sizes = {name: linear.weight.numel() for name, linear in prunable_linears(model).items()
             if method.selects(name, linear)}
    if not sizes:
        raise ConfigError(f"method.targets={list(method.targets)} less method.ignore={list(method.ignore)} select "
                          f"none of the {len(prunable_linears(model))} prunable linears (e.g. "
                          f"{next(iter(prunable_linears(model)))}); allowed: patterns that leave at least one")
    allocator, pruner = method.allocator, method.pruner
    allocator.check(sparsity, len(sizes))  # before the (long) dense pass
    point = None if resume is None else resume.load()
    if point is None:
        allocation = _allocate(model, method, samples, sparsity, device, sizes, cache, stream, make_llm, on_step,
                               batch, resume)
        if resume is not None:
            resume.save_allocation(allocation)
        start, inputs = 0, None
    else:
        allocation, start, inputs = point.allocation, point.next_block, point.inputs
        allocator.block_weights = allocation.block_weights
        if pruner.needs_dense_pass:
            pruner.load_dense_state(allocation.pruner_state)
        for index in range(start):
            arch.load_block(blocks[index], resume.block(index, blocks[index].state_dict()))
        log.info("%s: resuming the pruning pass at block %d of %d", method.name, start, len(blocks))
    rates = allocation.rates
    seconds = dict(allocation.seconds)

    def prune_block(view: BlockView) -> None:
        if resume is not None:
            resume.dense_block(view.index, view.block)
        pruner.prune_block(view, rates)

    def done(index: int, block: nn.Module, outputs: Optional[torch.Tensor]) -> None:
        if resume is not None:
            resume.save_block(index, block, outputs if index + 1 < len(blocks) else None)

    started = time.perf_counter()
    desc, on_block = f"{method.name}: pruning", _step_reporter(on_step)("prune")
    if sparsity == 0 and not pruner.quantizes:
        pass  # nothing to remove (a quantizing pruner still has work at sparsity 0)
    elif pruner.stats_level == "none":  # data-free: no forward needed
        for index, block in walk(blocks, desc, stream, start, on_block, edited=True):
            prefix = f"{arch.block_name(index)}."
            linears = {prefix + name: module for name, module in arch.linears(block).items()}
            prune_block(BlockView(index, block, arch, linears, {}, torch.empty(0), None))
            done(index, block, None)
    else:
        traverse(model, samples, device, pruner.stats_level, prune_block,
                 edits=True, desc=desc, cache=cache, stream=stream, on_block=on_block, batch=batch, start=start,
                 inputs=inputs, done=done)
    seconds["prune"] = time.perf_counter() - started
    return PruneReport(rates=rates, seconds=seconds, details=allocation.details,
                       resumed_from=None if point is None else start)


def _step_reporter(on_step: OnStep) -> Callable[[str], OnBlock]:
    """pass name -> the `on_block` of a walk that reports that pass's steps to `on_step`."""
    def for_pass(name: str) -> OnBlock:
        return None if on_step is None else lambda index, total, seconds: on_step(name, index, total, seconds)
    return for_pass


def _allocate(model: nn.Module, method: Method, samples: torch.Tensor, sparsity: float, device: str,
              sizes: dict[str, int], cache: Optional[CellCache], stream: Optional[Stream],
              make_llm: Optional[MakeLLM], on_step: OnStep, batch: int, scores: Optional[SearchScores] = None
              ) -> Allocation:
    """The phase before pruning: the dense pass, the search (its fitness values kept in `scores`),
    `allocate` and `finish`."""
    allocator, pruner = method.allocator, method.pruner
    seconds = {}
    step_done = _step_reporter(on_step)
    # One observe-only pass over the dense model serves every component that needs one (CFSP's single
    # forward pass: block scores for the allocator and channel scores for a structured pruner).
    observers = [c for c in (allocator, pruner) if c.needs_dense_pass]
    if observers:
        start = time.perf_counter()
        level = max((c.observe_level for c in observers), key=STATS_LEVELS.index)

        def observe() -> list[Any]:
            traverse(model, samples, device, level, lambda view: [c.observe_block(view) for c in observers],
                     edits=False, desc=f"{method.name}: dense statistics", cache=cache, stream=stream,
                     on_block=step_done("dense_statistics"), batch=batch)
            return [c.dense_state() for c in observers]

        if cache is None:
            observe()
        else:
            for component, state in zip(observers, cache.dense_state(samples, level, batch, observe)):
                component.load_dense_state(state)
        seconds["allocate_observe"] = time.perf_counter() - start
    start = time.perf_counter()
    if allocator.needs_search:
        def search() -> tuple[dict, dict]:  # bind loads the search's LLM: not needed when the cache has it
            allocator.bind(SearchContext(model, samples, pruner, device, make_llm, batch=batch,
                                         on_candidate=step_done("search"), scores=scores))
            return allocator.allocate(sizes, sparsity), allocator.finish()

        rates, details = search() if cache is None else cache.search(
            samples, sparsity, device, batch, *allocator.search_identity(pruner), search)
    else:
        rates, details = allocator.allocate(sizes, sparsity), allocator.finish()
    seconds["allocate"] = time.perf_counter() - start
    return Allocation(rates=rates, details=details, block_weights=allocator.block_weights,
                      pruner_state=pruner.dense_state() if pruner.needs_dense_pass else None, seconds=seconds)
