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


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
HUB_KEYS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


def checkpoint_folder(where, subfolder: str = "", **hub) -> Path:
    """The folder of a checkpoint named as transformers names one: a local folder, or a hub repo id whose
    weights, config and code are fetched into the hub cache (offline: read from it) as transformers does."""
    folder = Path(where)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        folder = Path(snapshot_download(str(where), allow_patterns=[pattern + ".safetensors", pattern + ".json",
                                                                    pattern + ".py"],
                                        **{k: v for k, v in hub.items() if k in HUB_KEYS and v is not None}))
    return folder / subfolder if subfolder else folder


def resolve_dtype(dtype, config) -> torch.dtype:
    """`dtype` as transformers reads it: None and "auto" (its default) are the dtype the config was saved in."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: allowed: 'auto', a torch.dtype or its name")
    return dtype


def empty_weights():
    """Build a model under this context: parameters on the meta device (no memory), buffers real, so that
    `load_into` places each weight where the device map puts it, one tensor at a time."""
    from accelerate import init_empty_weights

    return init_empty_weights()


def _device_map(model: nn.Module, device_map, max_memory, dtype) -> dict:
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, dict):
        placement = dict(device_map)
    elif device_map in DEVICE_MAP_STRATEGIES:
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=device_map == "balanced_low_0")
        placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    else:  # one device: "cpu", "cuda:1", 0, torch.device(...)
        placement = {"": device_map}
    if "disk" in placement.values():
        raise ValueError(f"device_map={device_map!r} puts {[k for k, v in placement.items() if v == 'disk']} on "
                         f"disk; allowed: devices only (give max_memory room for the model on GPUs and CPU)")
    return placement


def _device_of(placement: dict, name: str):
    prefixes = [p for p in placement if p == "" or name == p or name.startswith(p + ".")]
    if not prefixes:
        raise ValueError(f"device_map names no device for {name}")
    return placement[max(prefixes, key=len)]


def _stored_name(key: str) -> str:
    """The model tensor a stored tensor is (part of): `<linear>.weight` for each part of its bitmask layout."""
    name, _, leaf = key.rpartition(".")
    return f"{name}.weight" if leaf in BITMASK_PARTS else key


def _tensors(handle):
    """(name, dense tensor) of one safetensors file, one at a time; bitmask weights decompressed."""
    keys = list(handle.keys())
    for key in keys:
        leaf = key.rpartition(".")[2]
        if leaf == "compressed":
            name = key[: -len(".compressed")]
            parts = {part: handle.get_tensor(f"{name}.{part}") for part in BITMASK_PARTS}
            yield from decompress({f"{name}.{part}": t for part, t in parts.items()}).items()
        elif leaf not in BITMASK_PARTS:
            yield key, handle.get_tensor(key)


@torch.no_grad()
def load_into(model: nn.Module, folder, dtype: torch.dtype, device_map=None, max_memory=None) -> nn.Module:
    """Load the checkpoint's `*.safetensors` into `model`, built under `empty_weights()` at its FFN widths:
    each tensor read from its file and put on the device `device_map` gives it (transformers' values: None
    is the CPU, a device, a dict of module prefixes, or "auto"/"balanced"/"sequential" computed with
    accelerate for `max_memory`), cast to `dtype`, so the model is never whole in host RAM. The biases
    pruning added where the family has none (FLAP's compensation on LLaMA) are created; a tensor the model
    lacks or a weight nobody provides is an error, not a silently random or dropped weight."""
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    names = set()
    for file in files:
        with safe_open(file, "pt") as handle:
            names.update(_stored_name(key) for key in handle.keys())
    modules = dict(model.named_modules())
    for key in names:
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.empty(module.out_features, device="meta"))
    model.tie_weights()
    placement = _device_map(model, device_map, max_memory, dtype)
    own = set(model.state_dict())
    unexpected = sorted(names - own)
    if unexpected:
        raise RuntimeError(f"{folder}: checkpoint does not match its config (unexpected {unexpected})")
    for file in files:
        with safe_open(file, "pt") as handle:
            for key, tensor in _tensors(handle):
                set_module_tensor_to_device(model, key, _device_of(placement, key), value=tensor,
                                            dtype=dtype if tensor.is_floating_point() else None)
    model.tie_weights()
    missing = sorted(name for name, p in model.named_parameters() if p.device.type == "meta")
    if missing:
        raise RuntimeError(f"{folder}: checkpoint does not match its config (missing {missing})")
    if len({str(device) for device in placement.values()}) > 1:
        dispatch_model(model, placement)
    else:
        model.to(next(iter(placement.values())))  # the buffers, built on the CPU
    if device_map is not None:
        model.hf_device_map = placement
    return model.eval()


class PrunedMixin:
    """Put before a family's CausalLM class, with the family's BLOCKS (path to the decoder blocks), FFN_IN
    and FFN_OUT (linears, relative to a block): the class builds every block at its saved FFN width and
    loads the weights whatever their layout, from a folder or a hub repo, honouring `dtype` ("auto" by
    default, as transformers), `device_map` and `max_memory`."""
    BLOCKS: str
    FFN_IN: tuple
    FFN_OUT: str

    def __init__(self, config):
        super().__init__(config)
        set_ffn_widths(self.get_submodule(self.BLOCKS), getattr(config, FFN_SIZES_KEY, None) or [],
                       self.FFN_IN, self.FFN_OUT)

    @classmethod
    def from_pretrained(cls, path, *args, config=None, dtype=None, torch_dtype=None, device_map=None,
                        max_memory=None, subfolder="", **kwargs):
        folder = checkpoint_folder(path, subfolder, **kwargs)
        if config is None:
            config = cls.config_class.from_pretrained(folder)
        dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config)
        with empty_weights():
            model = cls._from_config(config, dtype=dtype)
        return load_into(model, folder, dtype, device_map, max_memory)
