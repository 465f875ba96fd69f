"""CFSP fine-grained channel importance (Wang et al. 2024, arXiv 2409.13199, Sec. 3.3), with the
released code (github.com/wyxscir/CFSP, `prune_cfsp`, local metric `three_w_one_wa`, b = c = 1) beside it.

Inside a block, FFN channel k is scored from the FFN's weights and the norm a_k = ||X_k||_2 (over all
calibration tokens) of its activation, the input of the FFN output linear (down / fc2):

    paper:    S_k = a_k * sum_i [ |W_out[i,k]| a_k / sum_k' |W_out[i,k']| a_k'       (output linear)
                               + sum_in |W_in[k,i]| / sum_k' |W_in[k',i]| ]          (gate+up, or fc1)

  i.e. relative importance (RIA-style: a weight's share of its row/column among the channels competing
  for it) of the activation-weighted output weights plus the input weights, times the activation.
  The paper states the relative-importance form; the axis of normalization is our reading: each
  weight is normalized over the *channels* (so weights change the ranking).

    released: S_k = a_k

  The released code normalizes every weight term over the channel's own column (`sum(dim=0)` of the
  (hidden, channels) matrices), so each term sums to 1 per channel and its mean over rows is the
  constant 1/hidden: the score collapses to 3/hidden * a_k, an activation-norm-only ranking. We
  implement that collapsed form directly (same ranking).

The number of channels to remove per block comes from the allocator (`cfsp_coarse` in the CFSP preset).
Scores are taken on the dense model, as the released code does (it compresses only after scoring
every block).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.core.vocab import check_choice
from methods.base import ChannelPruner
from methods.registry import register_pruner

FINE_SCORES = ("paper", "released")


@register_pruner("cfsp_fine")
class CFSPFine(ChannelPruner):
    @dataclass
    class Options:
        fine_score: str = "paper"  # paper | released

        def __post_init__(self):
            check_choice("method.fine_score", self.fine_score, FINE_SCORES)

    def channel_scores(self, view) -> torch.Tensor:
        arch = view.arch
        prefix = arch.block_name(view.index) + "."
        act = view.stats[prefix + arch.ffn_out].col_norms()
        if self.options.fine_score == "released":
            return act
        weighted = view.block.get_submodule(arch.ffn_out).weight.float().abs() * act  # (hidden, channels)
        relative = (weighted / weighted.sum(1, keepdim=True).clamp_min(1e-12)).sum(0)
        for name in arch.ffn_in:
            weight = view.block.get_submodule(name).weight.float().abs()  # (channels, hidden)
            relative += (weight / weight.sum(0, keepdim=True).clamp_min(1e-12)).sum(1)
        return relative * act
