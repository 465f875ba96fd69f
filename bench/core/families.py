"""Family adapters: where a model family keeps its decoder blocks, prunable linears and final norm.

A family is keyed by the checkpoint's `config.model_type`, the one name that cannot disagree with the
weights. Each adapter lists the block's linears in *input groups*: linears that read the same tensor (q/k/v,
gate/up) share one input statistic, so the engine computes X^T X once per group. Everything else in
the harness is family-agnostic.

Structured pruning shrinks FFNs physically (`Arch.shrink_ffn`): an FFN channel is a row of every
`ffn_in` linear and a column of `ffn_out`, so blocks end up with different intermediate sizes. No
transformers family supports per-layer FFN widths in its config, so a saved shrunk model carries its
widths as `config.prunebench_ffn_sizes` and is reloaded by `load_shrunk` (which `bench.models.load`
calls for such checkpoints): the stock loader would refuse the mismatched shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers.initialization import no_init_weights

from bench.core.vocab import ConfigError

FFN_SIZES_KEY = "prunebench_ffn_sizes"


@dataclass(frozen=True)
class Arch:
    family: str
    blocks_path: str  # attribute path from the CausalLM to the ModuleList of decoder blocks
    groups: tuple  # tuples of linear names (relative to a block) that read the same input
    ffn_in: tuple  # linears whose output rows are FFN channels (fc1 / gate+up)
    ffn_out: str  # linear whose input columns are FFN channels (fc2 / down)
    final_norm: str  # attribute path from the CausalLM to the norm applied before the LM head

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for attr in self.blocks_path.split("."):
            module = getattr(module, attr)
        return module

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for group in self.groups for name in group}

    def final_norm_of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def ffn_width(self, block: nn.Module) -> int:
        return block.get_submodule(self.ffn_out).in_features

    @torch.no_grad()
    def shrink_ffn(self, block: nn.Module, keep: torch.Tensor) -> None:
        """Keep only the FFN channels `keep` (indices): rows of the ffn_in linears, columns of ffn_out."""
        if keep.numel() == 0:
            raise ValueError("structured pruning would remove every FFN channel of a block; lower the sparsity")
        keep = keep.sort().values
        for name in self.ffn_in:
            _keep_features(block.get_submodule(name), keep, dim=0)
        out = block.get_submodule(self.ffn_out)
        _keep_features(out, keep, dim=1)
        parent = block.get_submodule(self.ffn_out.rpartition(".")[0]) if "." in self.ffn_out else block
        if hasattr(parent, "intermediate_size"):  # LlamaMLP keeps it as an attribute; keep it truthful
            parent.intermediate_size = int(keep.numel())

    @torch.no_grad()
    def add_ffn_out_bias(self, block: nn.Module, delta: torch.Tensor) -> None:
        """Add `delta` to the FFN output bias, creating the bias where the family has none (LLaMA)."""
        out = block.get_submodule(self.ffn_out)
        if out.bias is None:
            out.bias = nn.Parameter(delta.to(out.weight.dtype).clone(), requires_grad=out.weight.requires_grad)
        else:
            out.bias += delta.to(out.bias.dtype)


ARCHS = {
    "opt": Arch(
        family="opt",
        blocks_path="model.decoder.layers",
        groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                ("fc1",), ("fc2",)),
        ffn_in=("fc1",),
        ffn_out="fc2",
        final_norm="model.decoder.final_layer_norm",
    ),
    "bloom": Arch(
        family="bloom",
        blocks_path="transformer.h",
        groups=(("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",)),
        ffn_in=("mlp.dense_h_to_4h",),
        ffn_out="mlp.dense_4h_to_h",
        final_norm="transformer.ln_f",
    ),
    "llama": Arch(
        family="llama",
        blocks_path="model.layers",
        groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
        final_norm="model.norm",
    ),
}


FAMILIES = tuple(ARCHS)


def arch_for(model: nn.Module) -> Arch:
    model_type = model.config.model_type
    if model_type not in ARCHS:
        raise ConfigError(f"model_type={model_type!r} (from the checkpoint's config) has no family adapter; "
                          f"allowed: {', '.join(FAMILIES)}")
    return ARCHS[model_type]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """All prunable linears by their full module name, in block order."""
    arch = arch_for(model)
    out = {}
    for index, block in enumerate(arch.blocks(model)):
        for name, linear in arch.linears(block).items():
            out[f"{arch.block_name(index)}.{name}"] = linear
    return out


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


def annotate_ffn_sizes(model: nn.Module) -> None:
    """Record per-block FFN widths in the config when they differ from what the config implies."""
    sizes = ffn_sizes(model)
    if any(size != _config_ffn_width(model.config) for size in sizes):
        setattr(model.config, FFN_SIZES_KEY, sizes)


def load_shrunk(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """Rebuild a checkpoint written from a physically shrunk model: the model is built from its config,
    every block's FFN cut to the recorded width, and the saved tensors loaded into it."""
    config = transformers.AutoConfig.from_pretrained(path)
    with no_init_weights():  # every tensor is overwritten below
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights
    arch = arch_for(model)
    for block, size in zip(arch.blocks(model), getattr(config, FFN_SIZES_KEY)):
        arch.shrink_ffn(block, torch.arange(size))
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    for key, tensor in state.items():  # biases added by pruning (FLAP compensation on LLaMA)
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        if leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(tensor, dtype=dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{path}: checkpoint does not match its config (missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)})")
    return model


def _config_ffn_width(config) -> int:
    for key in ("intermediate_size", "ffn_dim"):
        if getattr(config, key, None):
            return getattr(config, key)
    return 4 * config.hidden_size  # BLOOM


def _keep_features(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    weight = linear.weight.data.index_select(dim, keep.to(linear.weight.device))
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, keep.to(linear.bias.device)),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


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
