"""Wanda-SP: the structured Wanda baseline (An et al. 2024, FLAP paper; as run by the CFSP paper,
released code `prune_wanda_sp`). FFN channel k scores mean_i |W_out[i,k]| * ||X_k||_2 (Wanda's
|W| x activation norm, averaged over the column of the FFN output linear); scores are z-scored within
each block and one threshold over the whole model removes the target fraction of channels, so blocks
get different widths (`selection=global`, the reference). `selection=per_block` instead removes the
allocator's per-block fraction (e.g. with `allocator=cfsp_coarse` as an ablation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.core.vocab import check_choice
from methods.base import ChannelPruner
from methods.registry import register_pruner

SELECTIONS = ("global", "per_block")


@dataclass
class GlobalSelectionOptions:
    selection: str = "global"  # global | per_block

    def __post_init__(self):
        check_choice("method.selection", self.selection, SELECTIONS)


class GlobalSelectionPruner(ChannelPruner):
    """A channel pruner whose `selection` is an option (global by default, as the references run)."""

    Options = GlobalSelectionOptions

    @property
    def selection(self) -> str:
        return self.options.selection


@register_pruner("wanda_sp")
class WandaSP(GlobalSelectionPruner):

    def channel_scores(self, view) -> torch.Tensor:
        arch = view.arch
        act = view.stats[f"{arch.block_name(view.index)}.{arch.ffn_out}"].col_norms()
        return (view.block.get_submodule(arch.ffn_out).weight.float().abs() * act).mean(0)
