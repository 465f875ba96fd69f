"""What a saved checkpoint contains, so that any tool loads it without prunebench.

- Dense-shaped models (unstructured, N:M, quantized-dequantized): the standard `save_pretrained` layout.
- Structured models whose blocks all kept the same FFN width: the standard layout too, with the family's
  width key (`intermediate_size`, `ffn_dim`) set to that width, so plain `from_pretrained` builds it.
- Per-block FFN widths (or a width the family's config cannot express, BLOOM's 4 x hidden): the model code
  ships with the checkpoint (`modeling_prunebench.py`, `auto_map`), the convention of per-layer-width
  models on the hub: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
- `save_format=bitmask`: every prunable weight `<linear>.weight` stored as its non-zeros plus a bit mask,
  as compressed-tensors' sparse-bitmask compressor (<= 0.14.0.1) stores it: tensors `<linear>.compressed`,
  `.bitmask`, `.shape`, `.row_offsets` (that release's `BitmaskCompressor.decompress` reads them:
  scripts/check_compressed_tensors.py), decompressed on load by the shipped model code. The releases
  that transformers 5 can use (>= 0.15) have no sparse compressor (README, "Checkpoints").

Every checkpoint carries its recipe: `recipe.yaml` (the resolved config) and `prunebench.json` (the
result record, with the protocol id). `use_cache` is saved as true: it is an inference setting that the
harness turns off for its own evaluation, not a property of the weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from bench.core import families, records
from bench.core.records import Result
from bench.core.vocab import check_choice

SAVE_FORMATS = ("dense", "bitmask")
MODELING_FILE = "modeling_prunebench.py"
RECIPE_FILE = "recipe.yaml"
RECORD_FILE = "prunebench.json"
WIDTH_KEYS = {"llama": "intermediate_size", "opt": "ffn_dim"}  # BLOOM's width is 4 x hidden_size, fixed
BASES = {"llama": ("llama", "LlamaForCausalLM"), "opt": ("opt", "OPTForCausalLM"), "bloom": ("bloom", "BloomForCausalLM")}
SPARSITY_KEY = "prunebench_sparsity_config"


def write_checkpoint(model: nn.Module, tokenizer, directory: Path, result: Optional[Result], resolved: dict,
                     save_format: str = "dense") -> Path:
    """Write the checkpoint of `model` into the fresh `directory`: weights, config, tokenizer, recipe."""
    check_choice("save_format", save_format, SAVE_FORMATS)
    directory = Path(directory)
    arch = families.arch_for(model)
    sizes = families.ffn_sizes(model)
    config = model.config
    saved = {"use_cache": config.use_cache, families.FFN_SIZES_KEY: getattr(config, families.FFN_SIZES_KEY, None)}
    config.use_cache = True
    if len(set(sizes)) == 1 and arch.family in WIDTH_KEYS:
        saved[WIDTH_KEYS[arch.family]] = getattr(config, WIDTH_KEYS[arch.family])
        setattr(config, WIDTH_KEYS[arch.family], sizes[0])  # the standard config describes the model
        if hasattr(config, families.FFN_SIZES_KEY):
            delattr(config, families.FFN_SIZES_KEY)
    else:
        families.annotate_ffn_sizes(model)
    remote = save_format == "bitmask" or not _standard_class_fits(model)
    if remote:
        module, base = BASES[arch.family]
        config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.PrunedForCausalLM"}
    try:
        model.save_pretrained(directory)
    finally:
        for key, value in saved.items():
            if value is None:
                if hasattr(config, key):
                    delattr(config, key)
            else:
                setattr(config, key, value)
        if remote:
            del config.auto_map
    tokenizer.save_pretrained(directory)
    if remote:
        (directory / MODELING_FILE).write_text(_modeling_code(arch, module, base))
    if save_format == "bitmask":
        _compress(directory, set(families.prunable_linears(model)), result)
    write_recipe(directory, result, resolved)
    return directory


def _standard_class_fits(model: nn.Module) -> bool:
    """Whether the family's own class, built from the config as saved, has exactly the model's tensors
    (names and shapes): per-block widths or a bias pruning added (FLAP's compensation on LLaMA) do not, and
    plain `from_pretrained` would fail or, worse, silently drop the bias."""
    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(model.config)
    ours, theirs = model.state_dict(), fresh.state_dict()
    return set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)


def write_recipe(directory: Path, result: Optional[Result], resolved: dict) -> None:
    """`recipe.yaml` (the resolved config) and `prunebench.json` (the record, its protocol id) beside the
    weights; called again when the cell ends, so the record there has the evaluation too."""
    directory = Path(directory)
    (directory / RECIPE_FILE).write_text("# prunebench: the resolved config this checkpoint was made with\n"
                                         + yaml.safe_dump(resolved, sort_keys=False))
    record = {"protocol_id": None if result is None else result.protocol.get("id"),
              "result": None if result is None else result.to_dict()}
    records.write_json_atomic(directory / RECORD_FILE, record)


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' sparse-bitmask layout of a 2-D weight: row-major non-zeros, one bit per entry
    (rows packed to bytes, little bit order), the shape, and where each row's non-zeros start."""
    mask = weight != 0
    packed = np.packbits(mask.cpu().numpy(), axis=1, bitorder="little")
    counts = mask.sum(dim=1)
    offsets = torch.cumsum(counts, 0) - counts
    return {"compressed": weight[mask].contiguous(), "bitmask": torch.from_numpy(packed),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64), "row_offsets": offsets.to(torch.int64)}


def _compress(directory: Path, linears: set[str], result: Optional[Result]) -> None:
    for file in sorted(directory.glob("*.safetensors")):
        state, out = load_file(file), {}
        for key, tensor in state.items():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name in linears:
                out.update({f"{name}.{part}": value for part, value in bitmask_compress(tensor).items()})
            else:
                out[key] = tensor
        save_file(out, file, metadata={"format": "pt"})
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config[SPARSITY_KEY] = {"format": "sparse-bitmask", "targets": sorted(linears),
                            "sparsity_structure": None if result is None else result.cell.sparsity_type,
                            "global_sparsity": None if result is None else result.sparsity.get("measured")}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _modeling_code(arch: families.Arch, module: str, base: str) -> str:
    return MODELING_TEMPLATE.format(module=module, base=base, blocks=arch.blocks_path, ffn_in=arch.ffn_in,
                                    ffn_out=arch.ffn_out, widths=families.FFN_SIZES_KEY, sparsity=SPARSITY_KEY)


MODELING_TEMPLATE = '''"""Model code shipped with a prunebench checkpoint (no prunebench import needed):
AutoModelForCausalLM.from_pretrained(this_dir, trust_remote_code=True).

- config.{widths}: the FFN width of every decoder block (structured pruning removed channels), so
  each block's MLP is built at its own width;
- config.{sparsity}: prunable weights stored as non-zeros + bit mask (compressed-tensors'
  sparse-bitmask layout), decompressed here on load.
"""
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig
from transformers.models.{module} import {base}

BLOCKS = "{blocks}"
FFN_IN = {ffn_in!r}
FFN_OUT = "{ffn_out}"


def _resized(linear, in_features, out_features, bias):
    return nn.Linear(in_features, out_features, bias=bias, dtype=linear.weight.dtype)


def _decompress(state):
    out = {{}}
    for key in list(state):
        if key.endswith(".compressed"):
            name = key[: -len(".compressed")]
            shape = tuple(state[name + ".shape"].tolist())
            bits = np.unpackbits(state[name + ".bitmask"].numpy(), axis=1, bitorder="little")[:, : shape[1]]
            mask = torch.from_numpy(bits.astype(bool))
            dense = torch.zeros(shape, dtype=state[key].dtype)
            dense[mask] = state[key]
            out[name + ".weight"] = dense
        elif not any(key.endswith(s) for s in (".bitmask", ".shape", ".row_offsets")):
            out[key] = state[key]
    return out


class PrunedForCausalLM({base}):
    def __init__(self, config):
        super().__init__(config)
        blocks = self.get_submodule(BLOCKS)
        for block, width in zip(blocks, getattr(config, "{widths}", None) or []):
            for name in FFN_IN:
                parent, _, leaf = name.rpartition(".")
                owner = block.get_submodule(parent) if parent else block
                old = getattr(owner, leaf)
                setattr(owner, leaf, _resized(old, old.in_features, width, old.bias is not None))
            parent, _, leaf = FFN_OUT.rpartition(".")
            owner = block.get_submodule(parent) if parent else block
            old = getattr(owner, leaf)
            setattr(owner, leaf, _resized(old, width, old.out_features, old.bias is not None))
            if hasattr(owner, "intermediate_size"):
                owner.intermediate_size = width

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        config = config if config is not None else AutoConfig.from_pretrained(path)
        state = {{}}
        for file in sorted(Path(path).glob("*.safetensors")):
            state.update(load_file(file))
        state = _decompress(state)
        model = cls(config)
        for key, tensor in state.items():  # biases pruning added where the family has none (FLAP)
            owner, _, leaf = key.rpartition(".")
            module = model.get_submodule(owner)
            if leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros_like(tensor))
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        tied = {{n for n, _ in model.named_parameters(remove_duplicate=False)}} - set(dict(model.named_parameters()))
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"{{path}}: weights do not match the config: missing {{sorted(set(missing) - tied)}}, "
                               f"unexpected {{sorted(unexpected)}}")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.eval()
'''
