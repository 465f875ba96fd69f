"""The sequential layer-wise engine (the SparseGPT protocol).

Calibration samples are embedded once and the inputs of block 0 captured; then, block by block, the
block's input statistics are collected with forward hooks, the method edits the block, and the edited
block's outputs become the next block's inputs, so each block is calibrated on what the already-pruned
model actually feeds it. Only the current block visits the compute device.

Input statistics are accumulated once per *input group* (linears reading the same tensor: q/k/v,
gate/up), since their X^T X is identical.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

import torch
from torch import nn
from tqdm import tqdm

from bench.core.families import Arch, arch_for
from bench.core.vocab import STATS_LEVELS

# `on_block(index, n_blocks, seconds)`: block `index` (from 0) of a walk is done and took `seconds`.
OnBlock = Optional[Callable[[int, int, float], None]]
# `on_step(pass, index, total, seconds)`: step `index` (from 0) of `total` of a pass took `seconds`.
OnStep = Optional[Callable[[str, int, int, float], None]]


class Stream(Protocol):
    """Blocks that live on disk (the meta device) until a walk reaches them, e.g. the harness's streamed
    checkpoint: `load` fills the block's weights, `release` takes them back (writing them out when
    `edited`)."""

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module, edited: bool) -> None: ...


class Block0Cache(Protocol):
    """Serves block 0's inputs and kwargs (they depend on the samples alone, not on any pruning):
    `compute()` gives them when the cache has none."""

    def block0(self, samples: torch.Tensor, device: str, batch: int, compute: Callable[[], tuple]) -> tuple: ...


@dataclass
class InputStats:
    """Running sums over all calibration tokens of one linear's input x (columns = input features)."""

    ntokens: int
    x_sum: torch.Tensor  # (cols,) sum of x
    sq_sum: torch.Tensor  # (cols,) sum of x^2
    xtx: Optional[torch.Tensor]  # (cols, cols) sum of x x^T, when level == "full"

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, the Hessian of the layer-wise squared reconstruction error."""
        return self.xtx * (2.0 / self.ntokens)

    def col_norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens, per input feature j (Wanda's activation norm)."""
        return self.sq_sum.sqrt()


class _Accumulator:
    """Forward hook accumulating InputStats for the module it is attached to."""

    def __init__(self, cols: int, level: str, device: torch.device):
        self.stats = InputStats(
            ntokens=0,
            x_sum=torch.zeros(cols, device=device),
            sq_sum=torch.zeros(cols, device=device),
            xtx=torch.zeros(cols, cols, device=device) if level == "full" else None,
        )

    def __call__(self, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        stats = self.stats
        stats.ntokens += x.shape[0]
        stats.x_sum += x.sum(0)
        if stats.xtx is not None:
            stats.xtx.addmm_(x.T, x)
            stats.sq_sum = stats.xtx.diagonal().clone()
        else:
            stats.sq_sum += (x * x).sum(0)


@dataclass
class BlockView:
    """What a method sees of one decoder block during a traversal."""

    index: int
    block: nn.Module
    arch: Arch
    linears: dict[str, nn.Linear]  # full module name -> linear
    stats: dict[str, InputStats]  # full module name -> its input statistics (shared within a group)
    inputs: torch.Tensor  # (nsamples, seqlen, hidden) block inputs
    outputs: Optional[torch.Tensor]  # block outputs before any edit (only in observe-only traversals)


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for a block during capture: records the keyword arguments the model passes it (once per
    batch size, set in `size` by the caller: a mask or rotary table built for one batch does not fit
    another, and BLOOM folds the batch into its ALiBi tensor's first dimension) and, for block 0, its
    hidden states. Blocks after 0 are called with the hidden states unchanged (only their kwargs
    matter; they may not even have the batch shape, BLOOM taking [0] of what a block returns); the last
    one aborts the forward, so neither the final norm nor the LM head runs.

    Block 0's inputs leave the device batch by batch, into one host buffer for all `total` samples (pinned
    when `pin`, for fast copies back): kept on the GPU and concatenated there, every C4 window at seqlen
    4096 was ~32 GB on the card, twice over while concatenating."""

    def __init__(self, block: nn.Module, first: bool, last: bool, total: int = 0, pin: bool = False):
        super().__init__()
        self.block = block
        self.first, self.last = first, last
        self.total, self.pin = total, pin
        self.hidden: Optional[torch.Tensor] = None  # (total, seqlen, hidden) on the host, filled up to `filled`
        self.filled = 0
        self.kwargs: dict[int, dict] = {}  # batch size -> the kwargs of the first call with it
        self.size = 0  # the batch size of the current forward

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder blocks are expected to take only hidden_states positionally")
        if self.first:
            batch = hidden_states.detach()
            if self.hidden is None:
                self.hidden = torch.empty((self.total, *batch.shape[1:]), dtype=batch.dtype, pin_memory=self.pin)
            self.hidden[self.filled:self.filled + batch.shape[0]].copy_(batch)
            self.filled += batch.shape[0]
        self.kwargs.setdefault(self.size, kwargs)
        if self.last:
            raise _StopForward
        return hidden_states

    def __getattr__(self, name):  # some models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def to_device(value, device, memo: Optional[dict] = None):
    """`value` (a tensor, or tuples, lists and dicts of them) moved to `device`; with a `memo` a tensor
    shared by several values (one mask for many blocks) is moved once."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device))  # keep `value` alive so its id stays unique
        return memo[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, memo) for k, v in value.items()}
    return value


def non_block_modules_to(model: nn.Module, arch: Arch, device) -> None:
    """Embeddings, final norm, head (everything but the blocks) to `device`; the blocks stay put."""
    blocks = arch.blocks(model)
    for block in blocks:
        if not _on_meta(block):  # a streamed block is not loaded yet
            block.to("cpu")
    stash = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = nn.Identity()  # moved separately: keep the (possibly huge) blocks off the device
    model.to(device)
    for index, block in enumerate(stash):
        blocks[index] = block


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


@torch.no_grad()
def capture_inputs(model: nn.Module, samples: torch.Tensor, device: str,
                   batch: int = 1) -> tuple[torch.Tensor, list[dict[int, dict]]]:
    """Inputs of block 0 for each sample (n, seqlen, hidden), on CPU, and the kwargs of each block by
    batch size: the samples go through the embeddings `batch` at a time, so there are at most two sizes
    (`batch`, and the remainder of n / batch), and `run_block` replays them in the same chunks.

    Each block keeps its own kwargs because models with alternating attention (Gemma 2/3, Qwen's
    sliding layers) give sliding and full-attention blocks different masks and rotary tables: replaying
    block 0's kwargs everywhere made Gemma-3's blocks 5, 11, 17 drift by 6-27%. No block runs here."""
    arch = arch_for(model)
    blocks = arch.blocks(model)
    non_block_modules_to(model, arch, device)
    pin = torch.device(device).type == "cuda"
    catchers = [_InputCatcher(block, index == 0, index == len(blocks) - 1, samples.shape[0], pin)
                for index, block in enumerate(blocks)]
    for index, catcher in enumerate(catchers):
        blocks[index] = catcher
    try:
        for start in range(0, samples.shape[0], batch):
            chunk = samples[start:start + batch]
            for catcher in catchers:
                catcher.size = chunk.shape[0]
            try:
                model(chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for index, catcher in enumerate(catchers):
            blocks[index] = catcher.block
        non_block_modules_to(model, arch, "cpu")
    hidden = catchers[0].hidden
    memo: dict = {}
    per_block = []
    for catcher in catchers:
        by_size = {}
        for size, captured in catcher.kwargs.items():
            kwargs = {k: v for k, v in captured.items() if k not in ("past_key_values", "layer_past")}
            kwargs["use_cache"] = False
            by_size[size] = to_device(kwargs, "cpu", memo)
        per_block.append(by_size)
    return hidden, per_block


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict[int, dict], device: str) -> torch.Tensor:
    """Forward the samples through one block with its kwargs (by batch size, from `capture_inputs`), in
    chunks of the largest captured batch size; outputs on CPU."""
    return run_block_form(block, inputs, kwargs, device)[0]


@torch.no_grad()
def run_block_form(block: nn.Module, inputs: torch.Tensor, kwargs: dict[int, dict],
                   device: str) -> tuple[torch.Tensor, bool]:
    """`run_block`, and whether the block returns a tuple (BLOOM, Falcon) rather than a tensor."""
    outputs = torch.empty_like(inputs)
    as_tuple = False
    batch = max(kwargs)
    for start in range(0, inputs.shape[0], batch):
        chunk = inputs[start:start + batch]
        out = block(chunk.to(device), **kwargs[chunk.shape[0]])
        as_tuple = isinstance(out, tuple)
        outputs[start:start + chunk.shape[0]] = (out[0] if as_tuple else out).to("cpu")
    return outputs, as_tuple


def walk(blocks, desc: str, stream: Optional[Stream] = None, start: int = 0, on_block: OnBlock = None,
         edited: bool = False) -> Iterator[tuple[int, nn.Module]]:
    """The one loop over the decoder blocks (pruning, dense statistics, layer-wise perplexity): yields
    each block from `start` on, loaded from `stream` first and released to it (`edited`: written out)
    when the caller is done with it, then reports it to `on_block` with the seconds it took."""
    for index in tqdm(range(start, len(blocks)), desc=desc, unit="block", initial=start, total=len(blocks)):
        block, started = blocks[index], time.perf_counter()
        if stream is not None:
            stream.load(index, block)
        yield index, block
        if stream is not None:
            stream.release(index, block, edited=edited)
        if on_block is not None:
            on_block(index, len(blocks), time.perf_counter() - started)


@torch.no_grad()
def traverse(model: nn.Module, samples: torch.Tensor, device: str, stats_level: str,
             visit: Callable[[BlockView], None], edits: bool, desc: str, share_stats: bool = True,
             cache: Optional[Block0Cache] = None, stream: Optional[Stream] = None, on_block: OnBlock = None,
             batch: int = 1, start: int = 0, inputs: Optional[torch.Tensor] = None,
             done: Optional[Callable[[int, nn.Module, torch.Tensor], None]] = None) -> None:
    """Walk the blocks sequentially, calling `visit` on each with its input statistics.

    `edits=True`: `visit` changes the block, so the block is re-run afterwards and *its* outputs feed
    the next block. `edits=False`: an observe-only pass over the dense model; the statistics forward
    already gives the outputs (exposed to `visit` as `view.outputs`).
    `share_stats=False` hooks every linear separately (only for measuring what sharing saves).
    `cache` serves block 0's inputs, which do not depend on any pruning.
    `stream` loads each block's weights when the walk reaches it and takes it back (writing it out when
    `edits`) when the walk leaves it.
    `on_block(index, n_blocks, seconds)` is called as each block is done, with the seconds it took.
    `batch`: samples per block forward. Blocks run in the model's dtype; statistics are summed in fp32
    whatever the batch, so it changes only the order of the sums (and the device memory needed).
    `start` > 0 continues an interrupted walk at that block, fed `inputs` (the outputs of the block
    before it); the blocks' kwargs are captured again (they depend on the samples alone).
    `done(index, block, outputs)` is called when the walk leaves a block (before `stream` takes it back).
    """
    if stats_level not in STATS_LEVELS:
        raise ValueError(f"stats level {stats_level!r}; allowed: {STATS_LEVELS}")
    arch = arch_for(model)
    if cache is None:
        hidden, kwargs = capture_inputs(model, samples, device, batch)
    else:
        hidden, kwargs = cache.block0(samples, device, batch, lambda: capture_inputs(model, samples, device, batch))
    kwargs = to_device(kwargs, device, {})  # one list of per-block kwargs
    if start > 0:
        hidden = inputs
    for index, block in walk(arch.blocks(model), desc, stream, start, on_block, edited=edits):
        block.to(device)
        prefix = f"{arch.block_name(index)}."
        stats: dict[str, InputStats] = {}
        outputs = None
        if stats_level != "none" or not edits:
            handles, owners = [], []
            groups = arch.groups if share_stats else tuple((name,) for g in arch.groups for name in g)
            for group in groups if stats_level != "none" else ():
                first = block.get_submodule(group[0])
                hook = _Accumulator(first.in_features, stats_level, device)
                handles.append(first.register_forward_hook(hook))
                owners.append((group, hook))
            try:
                outputs = run_block(block, hidden, kwargs[index], device)
            finally:
                for handle in handles:
                    handle.remove()
            for group, hook in owners:
                for name in group:
                    stats[prefix + name] = hook.stats
        linears = {prefix + name: module for name, module in arch.linears(block).items()}
        visit(BlockView(index, block, arch, linears, stats, hidden, None if edits else outputs))
        if edits:
            outputs = run_block(block, hidden, kwargs[index], device)
        block.to("cpu")
        if done is not None:
            done(index, block, outputs)
        hidden = outputs
