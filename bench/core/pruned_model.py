"""How a pruned model's shape and weights come back: shipped verbatim as a checkpoint's
`modeling_prunebench.py`, with a tail that names the family's class and where its FFN is
(bench/checkpoint.py), so this module imports nothing of prunebench: users load the checkpoint with plain
transformers, `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Prunebench shrinks FFNs
(`Arch.shrink_ffn`) and loads its own checkpoints with these same functions, so the two cannot drift.

- config.prunebench_ffn_sizes: the FFN width of every decoder block (structured pruning removed channels),
  so each block's FFN is built at its own width;
- config.prunebench_sparsity_config: prunable weights stored as non-zeros + bit mask (compressed-tensors'
  sparse-bitmask layout), decompressed here on load.
"""
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

FFN_SIZES_KEY = "prunebench_ffn_sizes"
SPARSITY_KEY = "prunebench_sparsity_config"
BITMASK_PARTS = ("compressed", "bitmask", "shape", "row_offsets")


@torch.no_grad()
def keep_ffn_channels(block: nn.Module, ffn_in: tuple, ffn_out: str, keep: torch.Tensor) -> None:
    """Keep only the FFN channels `keep` (sorted indices): rows of the `ffn_in` linears, columns of `ffn_out`.
    The linears are cut in place, so a family's own Linear subclass (Falcon's) keeps its forward."""
    for name in ffn_in:
        _keep_features(block.get_submodule(name), keep, dim=0)
    _keep_features(block.get_submodule(ffn_out), keep, dim=1)
    parent = block.get_submodule(ffn_out.rpartition(".")[0]) if "." in ffn_out else block
    if hasattr(parent, "intermediate_size"):  # LlamaMLP keeps it as an attribute; keep it truthful
        parent.intermediate_size = int(keep.numel())


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


def set_ffn_widths(blocks: nn.ModuleList, widths: list, ffn_in: tuple, ffn_out: str) -> None:
    """Give each block of a model built from its config the FFN width its checkpoint was saved with."""
    for block, width in zip(blocks, widths):
        if width != block.get_submodule(ffn_out).in_features:
            keep_ffn_channels(block, ffn_in, ffn_out, torch.arange(width))


def decompress(state: dict) -> dict:
    """The dense state of a state whose prunable weights are in the sparse-bitmask layout."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".compressed"):
            name = key[: -len(".compressed")]
            shape = tuple(state[name + ".shape"].tolist())
            bits = np.unpackbits(state[name + ".bitmask"].numpy(), axis=1, bitorder="little")[:, : shape[1]]
            dense = torch.zeros(shape, dtype=tensor.dtype)
            dense[torch.from_numpy(bits.astype(bool))] = tensor
            out[name + ".weight"] = dense
        elif key.rpartition(".")[2] not in BITMASK_PARTS:
            out[key] = tensor
    return out


@torch.no_grad()
def load_weights(model: nn.Module, path) -> None:
    """Load the checkpoint's `*.safetensors` into `model` (already at its FFN widths), creating the
    biases pruning added where the family has none (FLAP's compensation on LLaMA); a tensor the model
    lacks or a weight nobody provides is an error, not a silently random or dropped weight."""
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    state = decompress(state)
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        if leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(tensor, dtype=module.weight.dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{path}: checkpoint does not match its config (missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)})")


class PrunedMixin:
    """Put before a family's CausalLM class, with the family's BLOCKS (path to the decoder blocks), FFN_IN
    and FFN_OUT (linears, relative to a block): the class builds every block at its saved FFN width and
    loads the weights whatever their layout."""
    BLOCKS: str
    FFN_IN: tuple
    FFN_OUT: str

    def __init__(self, config):
        super().__init__(config)
        set_ffn_widths(self.get_submodule(self.BLOCKS), getattr(config, FFN_SIZES_KEY, None) or [],
                       self.FFN_IN, self.FFN_OUT)

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        model = cls(config if config is not None else cls.config_class.from_pretrained(path))
        load_weights(model, path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.eval()
