"""What a saved checkpoint contains, so that any tool loads it without prunebench, and how prunebench
loads it back. What it needs of a family comes from the family's adapter (`Arch`: the FFN width's config
key, where the blocks and FFN linears are) and from the model itself (its transformers class): a family
that prunes saves with no entry of its own.

- Dense-shaped models (unstructured, N:M, quantized-dequantized): the standard `save_pretrained` layout.
- Structured models whose blocks all kept the same FFN width: the standard layout too, with the family's
  width key (`Arch.width_key`: `intermediate_size`, `ffn_dim`, ...) set to that width, so plain
  `from_pretrained` builds it.
- Per-block FFN widths (or a width the family's config cannot express, BLOOM's 4 x hidden): the model code
  ships with the checkpoint (`modeling_prunebench.py`, `auto_map`), the convention of per-layer-width
  models on the hub: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. That file is
  `bench/core/pruned_model.py` verbatim plus a tail subclassing the model's own class.
- `save_format=bitmask`: every prunable weight `<linear>.weight` stored as its non-zeros plus a bit mask,
  as compressed-tensors' sparse-bitmask compressor (<= 0.14.0.1) stores it: tensors `<linear>.compressed`,
  `.bitmask`, `.shape`, `.row_offsets` (that release's `BitmaskCompressor.decompress` reads them:
  scripts/check_compressed_tensors.py), decompressed on load by the shipped model code. The releases
  that transformers 5 can use (>= 0.15) have no sparse compressor (README, "Checkpoints").

Every checkpoint carries how it was made: `prunebench_config.yaml` (our resolved config, which
`python run.py --config-dir <dir> --config-name prunebench_config save_dir=null` replays; checkpoints
written before it had that name call it `recipe.yaml`, which llm-compressor cannot read) and
`prunebench.json` (the result record, with the protocol id). `use_cache` is saved as true: it is an inference setting that the
harness turns off for its own evaluation, not a property of the weights.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from bench.core import families, pruned_model, records
from bench.core.pruned_model import FFN_SIZES_KEY, SPARSITY_KEY
from bench.core.records import Result
from bench.core.vocab import ConfigError, check_choice

SAVE_FORMATS = ("dense", "bitmask")
MODELING_FILE = "modeling_prunebench.py"
POSITION_KEYS = ("max_position_embeddings", "n_positions")  # what families call their position table's length
AUTO_MAP = {"AutoConfig": f"{MODELING_FILE[:-3]}.PrunedConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.PrunedForCausalLM"}
# A checkpoint that ships its code gets a model_type of its own: transformers then refuses every load
# without trust_remote_code, where the family's own model_type let a plain load build the family's class
# and silently re-initialise bitmask weights or drop an added bias. The family's own is kept beside it.
MODEL_TYPE_PREFIX = "prunebench_"
BASE_TYPE_KEY = "prunebench_base_model_type"
CONFIG_FILE = "prunebench_config.yaml"
RECORD_FILE = "prunebench.json"
CODE_DIGEST_KEY = "modeling_sha256"  # of MODELING_FILE, in RECORD_FILE
_ABSENT = object()


def write_checkpoint(model: nn.Module, tokenizer, directory: Path, result: Optional[Result], resolved: dict,
                     save_format: str = "dense") -> Path:
    """Write the checkpoint of `model` into the fresh `directory`: weights, config, tokenizer, recipe.
    The in-memory model's config is left as it was."""
    check_choice("save_format", save_format, SAVE_FORMATS)
    directory = Path(directory)
    arch = families.arch_for(model)
    config = model.config
    saved = {key: getattr(config, key, _ABSENT) for key in ("use_cache", FFN_SIZES_KEY, "auto_map", arch.width_key)
             if key is not None}
    try:
        config.use_cache = True
        remote = not _describe_widths(model, arch) or save_format == "bitmask"
        if remote:
            config.auto_map = AUTO_MAP
        # transformers would rename some tensors to a family's legacy layout (GPT-NeoX's lm_head as embed_out)
        # and rename them back only for its own classes; the shipped code loads the model's own names
        model.save_pretrained(directory, save_original_format=not remote)
    finally:
        for key, value in saved.items():
            if value is _ABSENT:
                if hasattr(config, key):
                    delattr(config, key)
            else:
                setattr(config, key, value)
    tokenizer.save_pretrained(directory)
    if remote:
        (directory / MODELING_FILE).write_text(modeling_code(model, arch))
        _own_model_type(directory / "config.json")
    if save_format == "bitmask":
        _compress(directory, set(families.prunable_linears(model)), result)
    write_recipe(directory, result, resolved)
    return directory


def _describe_widths(model: nn.Module, arch: families.Arch) -> bool:
    """Make the config say the model's FFN widths: the family's width key when every block kept the same
    width, else (or where the config has no such key) `FFN_SIZES_KEY`. Whether the family's own class, built
    from the config as saved, then has exactly the model's tensors (names and shapes): per-block widths or
    a bias pruning added (FLAP's compensation on LLaMA) do not, and plain `from_pretrained` would fail or,
    worse, silently drop the bias."""
    config = model.config
    if hasattr(config, FFN_SIZES_KEY):
        delattr(config, FFN_SIZES_KEY)
    sizes = None if arch.fused_ffn_in else families.ffn_sizes(model)  # fused: never shrunk (check_structured)
    if sizes and arch.width_key is not None and len(set(sizes)) == 1:
        setattr(config, arch.width_key, sizes[0])
    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(config)
    if sizes and families.ffn_sizes(fresh) != sizes:
        setattr(config, FFN_SIZES_KEY, sizes)
    ours, theirs = model.state_dict(), fresh.state_dict()
    return set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)


def modeling_code(model: nn.Module, arch: families.Arch) -> str:
    """`modeling_prunebench.py` for this model: the standalone loader, and the model's own classes (config
    and model) with the checkpoint's own model_type and the adapter's block and FFN names."""
    base, base_config = type(model), type(model.config)
    return (inspect.getsource(pruned_model)
            + f"\n\n# {arch.family}: the model's own classes, with where its adapter finds blocks and FFN linears\n"
            + f"from {base_config.__module__} import {base_config.__name__}\n"
            + f"from {base.__module__} import {base.__name__}\n\n\n"
            + f"class PrunedConfig({base_config.__name__}):\n"
            + f"    model_type = {MODEL_TYPE_PREFIX + model.config.model_type!r}\n\n\n"
            + f"class PrunedForCausalLM(PrunedMixin, {base.__name__}):\n"
            + "    config_class = PrunedConfig\n"
            + f"    BLOCKS = {arch.blocks_path!r}\n    FFN_IN = {arch.ffn_in!r}\n    FFN_OUT = {arch.ffn_out!r}\n")


def _own_model_type(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config[BASE_TYPE_KEY] = config["model_type"]
    config["model_type"] = MODEL_TYPE_PREFIX + config["model_type"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def ships_model_code(where: str | Path) -> bool:
    """Whether the checkpoint at `where` (a folder or a hub id) ships prunebench's model code; read from
    its config.json alone, which no class of ours or theirs is built from."""
    config, _ = transformers.PretrainedConfig.get_config_dict(str(where))
    return (config.get("auto_map") or {}).get("AutoModelForCausalLM") == AUTO_MAP["AutoModelForCausalLM"]


def folder_problem(where: str | Path) -> Optional[str]:
    """Why `where` is no checkpoint folder transformers could load (missing, a file, no config.json, one that
    does not parse or names no model_type), or None; read before any cell, not in every cell's traceback."""
    folder = Path(where).expanduser()
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return "has no config.json"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"has a config.json that does not read as JSON ({type(exc).__name__})"
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return "has a config.json that names no model_type"
    return None


def context_length(where: str | Path) -> Optional[int]:
    """The positions a local checkpoint's config.json states (max_position_embeddings, n_positions), or None
    where it states none or cannot be read (loading it then says what is wrong)."""
    try:
        config = json.loads((Path(where).expanduser() / "config.json").read_text())
        found = [config.get(key) for key in POSITION_KEYS if isinstance(config.get(key), int)]
    except (OSError, ValueError, AttributeError):
        return None
    return found[0] if found else None


def base_config(where: str | Path) -> transformers.PretrainedConfig:
    """The family's own config of a checkpoint that ships our code (its model_type is its own)."""
    config, _ = transformers.PretrainedConfig.get_config_dict(str(where))
    config = {k: v for k, v in config.items() if k != "auto_map"}
    config["model_type"] = config.pop(BASE_TYPE_KEY, config["model_type"])
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def load(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """A checkpoint that ships our model code (a folder or a hub id), loaded without running that copy: the
    family's class built from the config, each block's FFN cut to its saved width, and the weights (bitmask
    ones decompressed) loaded into it, by the same functions the shipped code runs."""
    folder = pruned_model.checkpoint_folder(path)
    verify_model_code(folder)
    config = base_config(folder)
    with pruned_model.empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    arch = families.arch_for(model)
    pruned_model.set_ffn_widths(arch.blocks(model), getattr(config, FFN_SIZES_KEY, None) or [], arch.ffn_in,
                                arch.ffn_out)
    return pruned_model.load_into(model, folder, dtype)


def write_recipe(directory: Path, result: Optional[Result], resolved: dict) -> None:
    """`prunebench_config.yaml` (the resolved config) and `prunebench.json` (the record, its protocol id, the files
    we wrote) beside the weights; called again when the cell ends, so the record there has the evaluation
    too. The file list is what `read_own_files` later trusts to replace the folder, so a rewrite keeps
    the list it finds rather than claiming files that appeared since."""
    directory = Path(directory)
    (directory / CONFIG_FILE).write_text("# prunebench: the resolved config this checkpoint was made with\n"
                                         + yaml.safe_dump(resolved, sort_keys=False))
    files = read_own_files(directory)
    if files is None:
        files = sorted({p.name for p in directory.iterdir() if p.is_file() and not p.is_symlink()} | {RECORD_FILE})
        shipped = directory / MODELING_FILE
        code_digest = _sha256(shipped) if shipped.is_file() else None
    else:  # the digest taken when the code was written, never one of a file changed since
        code_digest = _read_record(directory).get(CODE_DIGEST_KEY)
    record = {"protocol_id": None if result is None else result.protocol.get("id"),
              "result": None if result is None else result.to_dict(), "files": files, CODE_DIGEST_KEY: code_digest}
    records.write_json_atomic(directory / RECORD_FILE, record)


def _read_record(directory: Path) -> dict:
    try:
        record = json.loads((Path(directory) / RECORD_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_model_code(directory: Path) -> None:
    """A checkpoint that ships our model code must ship the very file we wrote: its SHA-256 is the one in
    its `prunebench.json`. Prunebench never runs that file, but whoever loads the checkpoint with
    `trust_remote_code=True` does, so a changed copy is refused rather than passed on."""
    shipped = Path(directory) / MODELING_FILE
    if not shipped.is_file():
        return
    recorded, actual = _read_record(directory).get(CODE_DIGEST_KEY), _sha256(shipped)
    if recorded != actual:
        raise ConfigError(f"model.path={str(directory)!r}: {MODELING_FILE} has SHA-256 {actual[:16]}..., but its "
                          f"{RECORD_FILE} records {str(recorded)[:16]}{'...' if recorded else ''}; the shipped model "
                          f"code was changed after prunebench wrote it (it runs under trust_remote_code=True); "
                          f"allowed: a checkpoint as prunebench wrote it")


def read_own_files(directory: Path) -> Optional[list[str]]:
    """The names of the files prunebench wrote into `directory`, from its `prunebench.json`; None when
    that record is missing, does not parse, lists no files, or the folder holds anything it does not
    list (a file merely named prunebench.json, or a checkpoint of ours a user added to, is not ours to
    replace)."""
    record = _read_record(directory)
    files = record.get("files")
    if not (isinstance(files, list) and RECORD_FILE in files and all(isinstance(f, str) for f in files)
            and {"protocol_id", "result"} <= set(record)):
        return None
    present = list(Path(directory).iterdir())
    if any(p.name not in files or p.is_symlink() or not p.is_file() for p in present):
        return None
    return files


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
