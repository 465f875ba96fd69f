"""Family adapters: where a model family keeps its decoder blocks, prunable linears, final norm and the
config key of its FFN width.

A family is keyed by the checkpoint's `config.model_type`, the one name that cannot disagree with the
weights. Each adapter lists the block's linears in *input groups*: linears that read the same tensor (q/k/v,
gate/up) share one input statistic, so the engine computes X^T X once per group. Everything else in
the harness, checkpoints included (bench/checkpoint.py), is family-agnostic: what it needs of a family
comes from its adapter, and the transformers class from the model itself.

Structured pruning shrinks FFNs physically (`Arch.shrink_ffn`): an FFN channel is a row of every
`ffn_in` linear and a column of `ffn_out`, so blocks end up with different intermediate sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from bench.core.pruned_model import keep_ffn_channels
from bench.core.vocab import ConfigError


@dataclass(frozen=True)
class Arch:
    family: str
    blocks_path: str  # attribute path from the CausalLM to the ModuleList of decoder blocks
    groups: tuple  # tuples of linear names (relative to a block) that read the same input
    ffn_in: tuple  # linears whose output rows are FFN channels (fc1 / gate+up)
    ffn_out: str  # linear whose input columns are FFN channels (fc2 / down)
    # the norm applied before the LM head (None: post-LN models such as OPT-350m have none); perplexity
    # never applies it by hand: the model's own forward does (bench/core/perplexity.py)
    final_norm: Optional[str]
    fused_ffn_in: tuple = ()  # ffn_in linears stacking several projections (gate_up): structured refused
    # the config key of the FFN width (intermediate_size, ffn_dim, ...); None where the config cannot set
    # it (BLOOM's is 4 x hidden_size): a checkpoint of shrunk blocks then ships its model code
    width_key: Optional[str] = None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for attr in self.blocks_path.split("."):
            module = getattr(module, attr)
        return module

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for group in self.groups for name in group}

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def check_structured(self) -> None:
        """Structured pruning removes FFN channels as rows of ffn_in; a fused gate_up linear holds each
        channel twice (rows c and c + width), a shape the pruners do not know."""
        if self.fused_ffn_in:
            raise ConfigError(f"model_type={self.family!r} fuses its FFN input projections in "
                              f"{', '.join(self.fused_ffn_in)}: structured (FFN channel) pruning is not supported; "
                              f"allowed with it: unstructured and N:M methods (e.g. method=wanda, sparsegpt)")

    def ffn_width(self, block: nn.Module) -> int:
        self.check_structured()
        return block.get_submodule(self.ffn_out).in_features

    @torch.no_grad()
    def shrink_ffn(self, block: nn.Module, keep: torch.Tensor) -> None:
        """Keep only the FFN channels `keep` (indices): rows of the ffn_in linears, columns of ffn_out."""
        if keep.numel() == 0:
            raise ValueError("structured pruning would remove every FFN channel of a block; lower the sparsity")
        keep_ffn_channels(block, self.ffn_in, self.ffn_out, keep.sort().values)

    @torch.no_grad()
    def load_block(self, block: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load the saved state of a pruned block into `block` (as loaded, dense), giving it the saved
        block's shape first: its FFN cut to the saved width (structured pruning) and the biases pruning
        added (FLAP's compensation on LLaMA) created."""
        width = state[f"{self.ffn_out}.weight"].shape[1]
        if width != block.get_submodule(self.ffn_out).in_features:
            self.shrink_ffn(block, torch.arange(width))
        bias = state.get(f"{self.ffn_out}.bias")
        if bias is not None and block.get_submodule(self.ffn_out).bias is None:
            self.add_ffn_out_bias(block, torch.zeros_like(bias))
        block.load_state_dict(state)

    @torch.no_grad()
    def add_ffn_out_bias(self, block: nn.Module, delta: torch.Tensor) -> None:
        """Add `delta` to the FFN output bias, creating the bias where the family has none (LLaMA)."""
        out = block.get_submodule(self.ffn_out)
        if out.bias is None:
            out.bias = nn.Parameter(delta.to(out.weight.dtype).clone(), requires_grad=out.weight.requires_grad)
        else:
            out.bias += delta.to(out.bias.dtype)


# Linear roles by leaf name, in the order a group lists them (q before k before v, gate before up).
ATTN_IN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value")
ATTN_OUT = ("o_proj", "out_proj", "dense")  # `dense` only under an attention module (FFNs use *_4h*)
FFN_IN = ("gate_proj", "up_proj", "fc1", "dense_h_to_4h", "gate_up_proj")
FFN_OUT = ("down_proj", "fc2", "dense_4h_to_h")
FUSED_FFN_IN = ("gate_up_proj",)  # gate and up stacked in one linear (Phi-3): no per-channel row set
FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm")
FFN_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "ffn_hidden_size")  # the first the config sets is the width

# Families whose adapter cannot be inferred from names. None today: OPT, BLOOM, LLaMA, Mistral,
# Qwen2/3, Gemma 2/3, Phi-3, GPT-NeoX and Falcon are all inferred (tests/test_families.py). GPT-2-style
# models (Conv1D `c_attn`/`c_proj`/`c_fc`, not nn.Linear) and MoE blocks (expert weights fused into
# 3-D parameters) are refused by inference and would need an entry here.
ARCHS: dict[str, Arch] = {}


def arch_for(model: nn.Module) -> Arch:
    """The explicit adapter of the model's `model_type`, else the one inferred from its modules."""
    model_type = model.config.model_type
    return ARCHS[model_type] if model_type in ARCHS else infer_arch(model)


def infer_arch(model: nn.Module) -> Arch:
    """The adapter read off the model: the decoder blocks are the ModuleList with
    `config.num_hidden_layers` entries nearest the root; the linears of block 0 get their roles from
    their leaf names (ATTN_IN, ATTN_OUT, FFN_IN, FFN_OUT); the final norm is the module named one of
    FINAL_NORMS outside the blocks, if any; the FFN width's config key is the first of FFN_WIDTH_KEYS the
    config sets. A block it cannot place is a ConfigError naming model_type."""
    model_type = model.config.model_type
    depth = getattr(model.config, "num_hidden_layers", None)
    lists = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and depth is not None and len(module) == depth]
    if not lists:
        raise ConfigError(f"model_type={model_type!r}: found no list of decoder blocks (an nn.ModuleList of "
                          f"config.num_hidden_layers={depth} modules); this family needs an explicit adapter "
                          f"in ARCHS of bench/core/families.py")
    blocks_path = min(lists, key=lambda name: name.count("."))
    block = model.get_submodule(blocks_path)[0]
    roles: dict[tuple, list[str]] = {ATTN_IN: [], ATTN_OUT: [], FFN_IN: [], FFN_OUT: []}
    unknown = []
    for name, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        role = next((r for r in roles if leaf in r), None)
        if leaf == "dense" and "att" not in parent:
            role = None
        if role is None:
            unknown.append(name)
        else:
            roles[role].append(name)
    missing = [label for label, role in (("attention input", ATTN_IN), ("attention output", ATTN_OUT),
                                         ("FFN input", FFN_IN), ("FFN output", FFN_OUT)) if not roles[role]]
    problems = ([f"unrecognised linears {unknown}"] if unknown else []) + \
        ([f"no {', '.join(missing)} linear"] if missing else []) + \
        ([f"several FFN outputs {roles[FFN_OUT]}"] if len(roles[FFN_OUT]) > 1 else [])
    if problems:
        raise ConfigError(f"model_type={model_type!r}: cannot infer the linear roles of {blocks_path}.0 "
                          f"({'; '.join(problems)}); known names: {', '.join(ATTN_IN + ATTN_OUT + FFN_IN + FFN_OUT)}")
    norms = [name for name, _ in model.named_modules()
             if name.rpartition(".")[2] in FINAL_NORMS and not name.startswith(blocks_path + ".")]
    for role in roles:
        roles[role].sort(key=lambda name: role.index(name.rpartition(".")[2]))
    fused = [name for name in roles[FFN_IN] if name.rpartition(".")[2] in FUSED_FFN_IN]
    return Arch(family=model_type, blocks_path=blocks_path,
                groups=tuple(tuple(roles[role]) for role in roles), ffn_in=tuple(roles[FFN_IN]),
                ffn_out=roles[FFN_OUT][0], final_norm=norms[0] if norms else None, fused_ffn_in=tuple(fused),
                width_key=next((k for k in FFN_WIDTH_KEYS if isinstance(getattr(model.config, k, None), int)), None))


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """All prunable linears by their full module name, in block order."""
    arch = arch_for(model)
    out = {}
    for index, block in enumerate(arch.blocks(model)):
        for name, linear in arch.linears(block).items():
            out[f"{arch.block_name(index)}.{name}"] = linear
    return out


def block_of(name: str) -> Optional[int]:
    """The decoder block a linear (or any module or tensor) belongs to, from its full name: the first
    all-digit part, its index in the ModuleList of blocks, which is the list nearest the root (infer_arch);
    None outside the blocks (embeddings, final norm, lm_head). Names alone suffice, so records use it too."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def ffn_sizes(model: nn.Module) -> list[int]:
    arch = arch_for(model)
    return [arch.ffn_width(block) for block in arch.blocks(model)]


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def structured_sparsity(model: nn.Module, dense_sizes: list[int], dense_params: int) -> dict:
    """What physical FFN removal achieved: channels removed (overall and per block), parameters removed."""
    sizes = ffn_sizes(model)
    return {
        "measured": 1 - sum(sizes) / sum(dense_sizes),  # "sparsity" of a structured method: FFN channels
        "ffn_channels_removed": 1 - sum(sizes) / sum(dense_sizes),
        "params_removed": 1 - parameter_count(model) / dense_params,
        "params": {"dense": dense_params, "pruned": parameter_count(model)},
        "ffn_sizes": sizes,
    }


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
