"""Magnitude-SP: the structured magnitude baseline of the CFSP paper (released code
`prune_magnitude_sp`): FFN channel k scores ||W_out[:, k]||_2, the L2 norm of its column of the FFN
output linear (down / fc2); each block removes its allocated fraction (uniform in the preset) of
lowest-scored channels. No calibration data.
"""
from __future__ import annotations

import torch

from methods.base import ChannelPruner
from methods.registry import register_pruner


@register_pruner("magnitude_sp")
class MagnitudeSP(ChannelPruner):
    needs_dense_pass = False

    def channel_scores(self, view) -> torch.Tensor:
        return view.block.get_submodule(view.arch.ffn_out).weight.float().norm(dim=0)
