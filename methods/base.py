"""Shared bases of pruners."""
from __future__ import annotations

from typing import Optional

import torch


class LinearPruner:
    """Base of pruners that decide each linear on its own, from its weight and input statistics."""

    def prune_block(self, view, rates: dict[str, float]) -> None:
        for name, linear in view.linears.items():
            self.prune_linear(linear.weight.data, view.stats.get(name), rates[name])

    def prune_linear(self, weight, stats, sparsity: float) -> None:
        raise NotImplementedError


class ChannelPruner:
    """Base of structured pruners: score every FFN channel of a block, then remove the lowest-scored
    channels physically (`Arch.shrink_ffn`), so the model gets smaller and faster.

    Scores are taken on the dense model, in the engine's observe-only pass (`needs_dense_pass`), as the
    CFSP/FLAP/Wanda-SP reference code does; a data-free scorer sets `needs_dense_pass = False` and is
    scored when its block is pruned. `selection = "per_block"` removes round(rate x width) channels of
    each block (rate from the allocator); `"global"` z-scores each block's channel scores and removes
    the lowest over the whole model at the allocator's mean rate (Wanda-SP/FLAP: the allocation is then
    the scores', not the allocator's).
    """

    structured = True
    supports_nm = False
    needs_dense_pass = True
    observe_level = "diag"  # channel scores read the FFN output linear's input norms/means
    stats_level = "none"  # removal itself needs no statistics of the partly pruned model

    def __init__(self, options, pattern):
        self.options = options
        self.scores: dict[int, torch.Tensor] = {}  # block index -> channel scores (dense model)
        self.global_removed: Optional[dict[int, torch.Tensor]] = None

    @property
    def selection(self) -> str:
        return getattr(self.options, "selection", "per_block")

    def channel_scores(self, view) -> torch.Tensor:
        """(width,) importance of each FFN channel of the block; lower is removed first."""
        raise NotImplementedError

    def compensate(self, view, removed: torch.Tensor) -> None:
        """Called before removal with the removed channel indices (FLAP's bias compensation)."""

    def dense_state(self) -> dict:  # what observe_block gathered, for bench/cache.py
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
