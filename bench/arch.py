"""Architecture adapters: where a family keeps its decoder blocks and prunable linears.

Each adapter lists the block's linears in *input groups*: linears that read the same tensor (q/k/v,
gate/up) share one input statistic, so the engine computes X^T X once per group. Everything else in
the harness is family-agnostic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    family: str
    blocks_path: str  # attribute path from the CausalLM to the ModuleList of decoder blocks
    groups: tuple  # tuples of linear names (relative to a block) that read the same input
    ffn_in: tuple  # linears whose output rows are FFN channels (fc1 / gate+up)
    ffn_out: str  # linear whose input columns are FFN channels (fc2 / down)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for attr in self.blocks_path.split("."):
            module = getattr(module, attr)
        return module

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for group in self.groups for name in group}

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"


ARCHS = {
    "opt": Arch(
        family="opt",
        blocks_path="model.decoder.layers",
        groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                ("fc1",), ("fc2",)),
        ffn_in=("fc1",),
        ffn_out="fc2",
    ),
    "bloom": Arch(
        family="bloom",
        blocks_path="transformer.h",
        groups=(("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",)),
        ffn_in=("mlp.dense_h_to_4h",),
        ffn_out="mlp.dense_4h_to_h",
    ),
    "llama": Arch(
        family="llama",
        blocks_path="model.layers",
        groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
    ),
}


def arch_for(model: nn.Module) -> Arch:
    model_type = model.config.model_type
    if model_type not in ARCHS:
        raise ValueError(f"model_type={model_type!r} has no adapter; supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """All prunable linears by their full module name, in block order."""
    arch = arch_for(model)
    out = {}
    for index, block in enumerate(arch.blocks(model)):
        for name, linear in arch.linears(block).items():
            out[f"{arch.block_name(index)}.{name}"] = linear
    return out


@torch.no_grad()
def measured_sparsity(model: nn.Module) -> tuple[float, dict[str, float]]:
    """Fraction of exactly-zero weights over all prunable linears (overall, and per linear)."""
    per_layer, zeros, total = {}, 0, 0
    for name, linear in prunable_linears(model).items():
        z = int((linear.weight == 0).sum())
        per_layer[name] = z / linear.weight.numel()
        zeros += z
        total += linear.weight.numel()
    return zeros / total, per_layer
