"""CFSP coarse-grained allocation (Wang et al. 2024, "CFSP: An Efficient Structured Pruning Framework
for LLMs with Coarse-to-Fine Activation Information", arXiv 2409.13199, Sec. 3.2), read beside the
authors' released code (github.com/wyxscir/CFSP, `prune_cfsp`).

Per decoder block, on the dense model (one observe-only forward pass):

    S_l = sum over calibration tokens t of arccos(cos(x_t, y_t)) / pi

with x_t / y_t the block's input / output hidden state (a NaN cosine, from a zero vector, counts 0.5
as in the released code). A block that changes its input more is more important and keeps more FFN
channels:

    z_l    = sigmoid(a * (S_l - mean S) / scale)           centre, scale, sigmoid
    keep_l = (1 - p) * z_l / mean z                          mean keep ratio = 1 - p
    if max keep > 1: z_l <- mean z + (z_l - mean z) * f      shrink the spread (released code: f chosen
                                                             so the top block lands at 1/1.05 of full)
    kept channels_l = keep_l * width_l, rounded to a multiple of `round_to` (released default 128)

Choices where the paper is silent or the code is tied to its protocol:
- scale: the released code divides the summed scores by 1e4 at 128 x 1024 calibration tokens. We
  use per-token means and divide by 1e4 / 131072, identical at that protocol and independent of the
  calibration size elsewhere (so `a` means the same thing under the quick protocol).
- rounding: the released code rounds each block independently, so the mean removal drifts from the
  target. We round with largest remainders under one budget, total kept units = round((1 - p) * total
  units): the mean removal equals the target exactly whenever the target is a whole number of units,
  and each block keeps between one unit and its whole (rounded-down) width.
- the allocation is per block; every FFN linear of a block gets the block's channel-removal fraction,
  attention linears get 0 (CFSP prunes only FFN channels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.core.engine import traverse
from bench.core.vocab import ConfigError, check_range
from methods.base import Allocator
from methods.registry import register_allocator

PAPER_TOKENS = 128 * 1024  # the released code's calibration tokens, to which its 1e4 scale is tied
SPREAD_MARGIN = 1.05  # released code: the most important block keeps 1/1.05 of its width after shrinking


def angular_distance(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """arccos(cos(x_t, y_t)) / pi per token t, in [0, 1]."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    y = outputs.reshape(-1, outputs.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=0.0).nan_to_num(nan=0.5).clamp(-1, 1)
    return torch.arccos(cos) / math.pi


def sigmoid_scores(mean_distances: list[float], a: float) -> list[float]:
    """Centred, scaled, sigmoid block scores z_l from per-token mean angular distances."""
    mean = sum(mean_distances) / len(mean_distances)
    return [1 / (1 + math.exp(-a * (d - mean) * PAPER_TOKENS / 1e4)) for d in mean_distances]


@register_allocator("cfsp_coarse")
class CFSPCoarse(Allocator):
    needs_dense_pass = True
    observe_level = "none"  # only the block inputs/outputs are read

    @dataclass
    class Options:
        a: float = 1.0  # sigmoid sharpness: 0 = uniform allocation, larger = more spread between blocks
        round_to: int = 128  # kept FFN channels per block are a multiple of this (1 = no rounding)

        def __post_init__(self):
            check_range("method.a", self.a, self.a >= 0, "a >= 0")
            check_range("method.round_to", self.round_to, self.round_to >= 1, ">= 1")

    def check_ffn(self, target: float, widths: list[int]) -> None:
        check_rounding(widths, self.options.round_to, target)

    def __init__(self, options: Options):
        super().__init__(options)
        self.distances: dict[int, float] = {}  # block index -> per-token mean angular distance
        self.widths: dict[int, int] = {}  # block index -> FFN channels
        self.ffn_linears: dict[int, list[str]] = {}  # block index -> full names of its FFN linears

    def dense_state(self) -> dict:
        return {"distances": self.distances, "widths": self.widths, "ffn_linears": self.ffn_linears}

    def load_dense_state(self, state: dict) -> None:
        self.distances, self.widths, self.ffn_linears = state["distances"], state["widths"], state["ffn_linears"]

    def observe_block(self, view) -> None:
        self.distances[view.index] = angular_distance(view.inputs, view.outputs).mean().item()
        self.widths[view.index] = view.arch.ffn_width(view.block)
        prefix = view.arch.block_name(view.index) + "."
        self.ffn_linears[view.index] = [prefix + n for n in (*view.arch.ffn_in, view.arch.ffn_out)]

    def allocate(self, sizes: dict[str, int], target: float) -> dict[str, float]:
        blocks = sorted(self.distances)
        z = sigmoid_scores([self.distances[b] for b in blocks], self.options.a)
        mean = sum(z) / len(z)
        if max(z) / mean * (1 - target) >= 1:
            factor = mean * (1 / (1 - target) - 1) / (max(z) - mean) / SPREAD_MARGIN
            z = [mean + (v - mean) * factor for v in z]
        self.block_weights = z  # final z_l (after spread shrinking), for IG-LoRA
        keep = [(1 - target) * v / mean for v in z]
        kept = round_channels([self.widths[b] for b in blocks], keep, self.options.round_to, target)
        rates = {name: 0.0 for name in sizes}
        for block, channels in zip(blocks, kept):
            for name in self.ffn_linears[block]:
                rates[name] = 1 - channels / self.widths[block]
        return rates


def check_rounding(widths: list[int], unit: int, target: float) -> None:
    """ConfigError where FFN widths (one per block) cannot keep at least one `unit` of channels per block."""
    if unit > min(widths):
        raise ConfigError(f"method.round_to={unit} is larger than the smallest FFN width ({min(widths)}); "
                          f"allowed: 1..{min(widths)}")
    if round((1 - target) * sum(widths) / unit) < len(widths):
        raise ConfigError(f"sparsity={target} leaves zero FFN channels in some block with method.round_to={unit}; "
                          f"allowed: sparsity <= {1 - len(widths) * unit / sum(widths):.3f} (one unit per block), "
                          f"or a smaller method.round_to")


def round_channels(widths: list[int], keep: list[float], unit: int, target: float) -> list[int]:
    """Kept channels per block: multiples of `unit`, at least one unit, at most the width (rounded down
    to units), total = round((1 - target) * total width / unit) units, closest to `keep` (largest
    remainders)."""
    check_rounding(widths, unit, target)
    caps = [w // unit for w in widths]
    budget = round((1 - target) * sum(widths) / unit)
    if budget > sum(caps):
        budget = sum(caps)  # widths not multiples of the unit: the rounded-down widths are the most we can keep
    ideal = [k * w / unit for k, w in zip(keep, widths)]
    units = [min(max(1, math.floor(v)), cap) for v, cap in zip(ideal, caps)]
    while sum(units) != budget:
        grow = sum(units) < budget
        candidates = [i for i in range(len(units)) if (units[i] < caps[i] if grow else units[i] > 1)]
        # the block farthest from its ideal in the needed direction moves one unit
        pick = max(candidates, key=lambda i: (ideal[i] - units[i]) if grow else (units[i] - ideal[i]))
        units[pick] += 1 if grow else -1
    return [u * unit for u in units]


def block_distances(model, samples: torch.Tensor, device: str) -> list[float]:
    """Per-token mean angular distance of every block of `model` (one observe-only pass), for IG-LoRA
    after an allocator that kept no coarse scores."""
    distances = []
    traverse(model, samples, device, "none",
             lambda view: distances.append(angular_distance(view.inputs, view.outputs).mean().item()),
             edits=False, desc="block importance")
    return distances
