"""FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models"),
restricted to FFN channels as in the CFSP paper's comparison (released code `prune_flap_bias`).

FFN channel k scores its fluctuation metric (WIFV)

    S_k = Var_t(x_tk) * ||W_out[:, k]||_2^2

with x_tk the input of the FFN output linear (down / fc2) over calibration tokens t; scores are
z-scored within each block and one global threshold removes the target fraction (adaptive structure).
The removed channels' mean contribution is folded into the output bias (bias compensation):

    b_out += W_out[:, removed] @ mean_t(x_t[removed])

so LLaMA blocks gain a down_proj bias (saved and reloaded by bench.core.families). Choices: the population
variance over all calibration tokens (the reference keeps a running, sample-weighted estimate);
attention heads are not pruned (FLAP prunes them too; CFSP's baseline does not).
"""
from __future__ import annotations

import torch

from bench.core.vocab import SparsityPattern
from methods.pruners.wanda_sp import GlobalSelectionPruner
from methods.registry import register_pruner


@register_pruner("flap")
class FLAP(GlobalSelectionPruner):
    def __init__(self, options, pattern: SparsityPattern):
        super().__init__(options, pattern)
        self.means: dict[int, torch.Tensor] = {}  # block index -> mean FFN activation per channel

    def channel_scores(self, view) -> torch.Tensor:
        arch = view.arch
        stats = view.stats[f"{arch.block_name(view.index)}.{arch.ffn_out}"]
        mean = stats.x_sum / stats.ntokens
        self.means[view.index] = mean.cpu()
        variance = (stats.sq_sum / stats.ntokens - mean ** 2).clamp_min(0)
        return variance * view.block.get_submodule(arch.ffn_out).weight.float().pow(2).sum(0)

    def dense_state(self) -> dict:
        # the channel means are dense statistics too: without them a cached cell cannot compensate
        return {"scores": self.scores, "means": self.means}

    def load_dense_state(self, state: dict) -> None:
        self.scores, self.means = state["scores"], state["means"]

    @torch.no_grad()
    def compensate(self, view, removed: torch.Tensor) -> None:
        out = view.block.get_submodule(view.arch.ffn_out)
        mean = self.means[view.index].to(out.weight.device)
        view.arch.add_ffn_out_bias(view.block, out.weight[:, removed].float() @ mean[removed])
