"""Perplexity under the SparseGPT protocol.

The split's text is tokenized as one sequence and cut into non-overlapping windows of an explicit
`seqlen` (no sliding context, trailing partial window dropped); each window is scored independently
and ppl = exp(mean token NLL over all windows), every window contributing seqlen - 1 predictions.

Two ways to run the model, giving the same numbers: whole (`window_nlls`: the model on the device, one
window at a time) or layer-wise (`layerwise_window_nlls`, the SparseGPT reference's way for big models:
all windows through block 0, then block 1, ..., one block on the device at a time, blocks optionally
streamed from disk; `batch` windows per block forward, which gives the same numbers as one at a time). `perplexity(..., layerwise="auto")` picks layer-wise when the model does not fit
the device's free memory.
"""
from __future__ import annotations

import math
import time
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bench.core import engine
from bench.core.families import arch_for

LAYERWISE = ("auto", True, False)
# The passes of `perplexity` that report each finished step to its `on_step` callback, and what a step is
# (layer-wise, the blocks' pass over all windows is the work; the final scoring runs only the head).
PPL_STEPS = {"ppl": "window", "ppl_layerwise": "block"}
FIT_MARGIN = 1.2  # the whole model needs its weights plus room for one window's activations and logits


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of one window: `logits` (1, seqlen, vocab) scored against `ids` (1, seqlen)."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean").item()


@torch.no_grad()
def window_nlls(model: nn.Module, windows: torch.Tensor, device: str, desc: str = "perplexity",
                on_step: engine.OnStep = None) -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64."""
    model.to(device)
    nlls = torch.empty(windows.shape[0], dtype=torch.float64)
    for index in tqdm(range(windows.shape[0]), desc=desc, unit="window"):
        started = time.perf_counter()
        ids = windows[index:index + 1].to(device)
        nlls[index] = window_nll(model(ids, use_cache=False).logits, ids)
        if on_step is not None:
            on_step("ppl", index, windows.shape[0], time.perf_counter() - started)
    model.to("cpu")
    return nlls


class _Replay(nn.Module):
    """Stands in for a block when scoring: the last one returns the final hidden state the layer-wise
    pass computed for the current window, so the model's own code (final norm, OPT's project_out,
    Gemma's logit soft-capping, the head) turns it into logits exactly as in a whole-model forward."""

    def __init__(self, block: nn.Module, last: bool, as_tuple: bool):
        super().__init__()
        self.block, self.last, self.as_tuple = block, last, as_tuple
        self.hidden = None

    def forward(self, hidden_states, *args, **kwargs):
        if not self.last:
            return hidden_states
        return (self.hidden,) if self.as_tuple else self.hidden

    def __getattr__(self, name):  # some models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


@torch.no_grad()
def layerwise_window_nlls(model: nn.Module, windows: torch.Tensor, device: str, stream: Optional[engine.Stream] = None,
                          desc: str = "perplexity (layer-wise)", on_step: engine.OnStep = None,
                          batch: int = 1) -> torch.Tensor:
    """`window_nlls`, computed block by block over all windows: only one block is on `device` at a time
    (plus embeddings and head), and the (n, seqlen, hidden) activations stay on the CPU. `stream` (see
    `engine.traverse`) loads each block from disk when it is reached and drops it after. `batch` windows
    go through a block per forward: a GPU idles on one window, and the windows never attend to each
    other (equal lengths, no padding), so each one's numbers are those of a forward of its own."""
    arch = arch_for(model)
    hidden, kwargs = engine.capture_inputs(model, windows, device, batch)
    kwargs = engine.to_device(kwargs, device, {})
    as_tuple = False
    on_block = None if on_step is None else lambda index, total, seconds: on_step("ppl_layerwise", index, total,
                                                                                   seconds)
    for index, block in engine.walk(arch.blocks(model), desc, stream, on_block=on_block):
        hidden, as_tuple = engine.run_block_form(block.to(device), hidden, kwargs[index], device)
        block.to("cpu")
    nlls = torch.empty(windows.shape[0], dtype=torch.float64)
    for row, logits in enumerate(head_logits(model, windows, hidden, as_tuple, device)):
        nlls[row] = window_nll(logits, windows[row:row + 1].to(device))
    return nlls


@torch.no_grad()
def head_logits(model: nn.Module, windows: torch.Tensor, hidden: torch.Tensor, as_tuple: bool,
                device: str) -> Iterator[torch.Tensor]:
    """The logits (1, seqlen, vocab) of each window from `hidden`, the last block's outputs of a layer-wise
    pass (`as_tuple`: the blocks return tuples), one window at a time on `device`."""
    arch = arch_for(model)
    blocks = arch.blocks(model)
    replays = [_Replay(block, index == len(blocks) - 1, as_tuple) for index, block in enumerate(blocks)]
    for index, replay in enumerate(replays):
        blocks[index] = replay
    engine.non_block_modules_to(model, arch, device)
    try:
        for row in range(windows.shape[0]):
            replays[-1].hidden = hidden[row:row + 1].to(device)
            yield model(windows[row:row + 1].to(device), use_cache=False).logits
    finally:
        for index, replay in enumerate(replays):
            blocks[index] = replay.block
        engine.non_block_modules_to(model, arch, "cpu")


def fits(model: nn.Module, device: str) -> bool:
    """Whether the whole model fits the device's free memory (the CPU holds it already)."""
    if any(p.is_meta for p in model.parameters()):
        return False  # streamed: the blocks are on disk
    if not device.startswith("cuda"):
        return True
    torch.cuda.empty_cache()  # what the allocator caches unused is free for the model
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size * FIT_MARGIN < free


def from_nlls(nlls: torch.Tensor) -> float:
    return math.exp(nlls.mean().item())


def perplexity(model: nn.Module, windows: torch.Tensor, device: str, desc: str = "perplexity",
               layerwise: Union[str, bool] = "auto",
               stream: Optional[engine.Stream] = None, on_step: engine.OnStep = None, batch: int = 1) -> float:
    """`layerwise`: True, False, or "auto" (layer-wise when the model does not `fit` the device).
    `on_step` hears of each step of the pass that runs (`PPL_STEPS`); `batch`: windows per block forward
    of the layer-wise pass."""
    if layerwise is True or stream is not None or (layerwise == "auto" and not fits(model, device)):
        return from_nlls(layerwise_window_nlls(model, windows, device, stream, desc=f"{desc} (layer-wise)",
                                               on_step=on_step, batch=batch))
    return from_nlls(window_nlls(model, windows, device, desc, on_step))
