"""Checkpoints any tool can load: each is reloaded in a fresh interpreter that cannot import prunebench,
with plain transformers, and must give the same logits bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from bench import checkpoint, models
from bench.cell import run_cell
from bench.config import ConfigError
from bench.core import families
from tests.conftest import TINY

IDS = torch.tensor([[5, 17, 200, 33, 91, 4, 250, 12]])
RELOAD = """
import sys, torch, transformers
ids = torch.load(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[3] == "1")
assert not any(name == "bench" or name.startswith(("bench.", "methods", "reports")) for name in sys.modules)
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[4])
print(type(model).__name__, model.config.use_cache)
"""


def reload_logits(directory: Path, tmp_path: Path, remote_code: bool) -> tuple[torch.Tensor, str]:
    """Logits of `directory` loaded by AutoModelForCausalLM in a fresh interpreter outside the repo."""
    torch.save(IDS, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", RELOAD, str(directory), str(tmp_path / "ids.pt"),
                          "1" if remote_code else "0", str(tmp_path / "logits.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt"), run.stdout.strip()


def tiny(make_config, name: str):
    cfg, _ = make_config(f"model={name}", *TINY)
    return models.load(cfg.model)


def shrink(model, widths: list[int]) -> None:
    arch = families.arch_for(model)
    generator = torch.Generator().manual_seed(0)
    for block, width in zip(arch.blocks(model), widths):
        keep = torch.randperm(arch.ffn_width(block), generator=generator)[:width]
        arch.shrink_ffn(block, keep)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("name,width_key", [("llama-tiny", "intermediate_size"), ("opt-tiny", "ffn_dim")])
def test_uniform_width_loads_with_plain_from_pretrained(make_config, tmp_path, name, width_key):
    model, tokenizer = tiny(make_config, name)
    shrink(model, [128, 128])
    expected = logits(model)
    target = models.save(model, tokenizer, tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    # before: the dense width and a prunebench-only key; from_pretrained failed with a size mismatch
    assert config[width_key] == 128 and families.FFN_SIZES_KEY not in config and "auto_map" not in config
    assert config["use_cache"] is True and model.config.use_cache is False  # the in-memory model is untouched
    reloaded, printed = reload_logits(target, tmp_path, remote_code=False)
    assert torch.equal(reloaded, expected), printed
    assert printed.endswith("True")


@pytest.mark.parametrize("name", ["llama-tiny", "bloom-tiny"])
def test_per_block_widths_load_with_the_shipped_model_code(make_config, tmp_path, name):
    model, tokenizer = tiny(make_config, name)
    shrink(model, [100, 150] if name == "llama-tiny" else [128, 128])  # BLOOM's config cannot say 128
    expected = logits(model)
    target = models.save(model, tokenizer, tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_prunebench.PrunedForCausalLM"}
    assert (target / checkpoint.MODELING_FILE).exists()
    reloaded, printed = reload_logits(target, tmp_path, remote_code=True)
    assert torch.equal(reloaded, expected) and printed.startswith("PrunedForCausalLM")
    assert torch.equal(logits(families.load_shrunk(target, torch.float32)), expected)  # prunebench's own loader


def two_four(model) -> None:
    """Keep the 2 largest |w| of every 4 consecutive inputs of every prunable linear."""
    with torch.no_grad():
        for linear in families.prunable_linears(model).values():
            groups = linear.weight.reshape(-1, 4)
            keep = groups.abs().topk(2, dim=1).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
            linear.weight.copy_((groups * mask).reshape(linear.weight.shape))


@pytest.mark.parametrize("name", ["llama-tiny", "opt-tiny"])
def test_two_four_bitmask_checkpoint_is_smaller_and_reloads_exactly(make_config, tmp_path, name):
    model, tokenizer = tiny(make_config, name)
    two_four(model)
    expected = logits(model)
    dense = models.save(model, tokenizer, tmp_path / "dense")
    packed = models.save(model, tokenizer, tmp_path / "bitmask", save_format="bitmask")
    size = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (dense, packed)}
    linear_bytes = sum(l.weight.numel() * 4 for l in families.prunable_linears(model).values())
    # half the linear weights' values are gone; one bit per entry comes back
    assert size["dense"] - size["bitmask"] > 0.4 * linear_bytes, size
    config = json.loads((packed / "config.json").read_text())
    assert config[checkpoint.SPARSITY_KEY]["format"] == "sparse-bitmask"
    stored = set().union(*(safe_open(f, "pt").keys() for f in packed.glob("*.safetensors")))
    for linear in families.prunable_linears(model):  # compressed-tensors' sparse-bitmask names
        assert {f"{linear}.{part}" for part in ("compressed", "bitmask", "shape", "row_offsets")} <= stored
        assert f"{linear}.weight" not in stored
    plain, _ = reload_logits(dense, tmp_path, remote_code=False)
    unpacked, printed = reload_logits(packed, tmp_path, remote_code=True)
    assert torch.equal(plain, expected) and torch.equal(unpacked, expected), printed


def test_bitmask_layout_roundtrips():
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0, 4.0]] * 2)
    packed = checkpoint.bitmask_compress(weight)
    assert packed["compressed"].tolist() == [1.5, -2.0, 3.0, 4.0] * 2
    assert packed["row_offsets"].tolist() == [0, 4] and packed["shape"].tolist() == [2, 9]
    assert packed["bitmask"].shape == (2, 2)  # 9 bits per row in 2 bytes


def test_a_cell_saves_its_recipe_and_record(make_config, tmp_path):
    cfg, resolved = make_config("model=llama-tiny", "method=wanda", "method.sparsity_type=2:4", *TINY,
                                f"save_dir={tmp_path / 'ckpt'}", "save_format=bitmask")
    result = run_cell(cfg, resolved, tmp_path / "cell")
    assert result.status == "ok", result.error
    saved = Path(result.saved_to)
    recipe = yaml.safe_load((saved / checkpoint.RECIPE_FILE).read_text())
    assert recipe["method"]["sparsity_type"] == "2:4" and recipe["save_format"] == "bitmask"
    record = json.loads((saved / checkpoint.RECORD_FILE).read_text())
    assert record["result"]["metrics"]["ppl"] == result.metrics["ppl"]  # written again after the evaluation
    assert record["protocol_id"] == result.protocol.get("id")


def test_unknown_save_format_names_the_key(make_config, tmp_path):
    model, tokenizer = tiny(make_config, "llama-tiny")
    with pytest.raises(ConfigError, match="save_format='zip' is not valid; allowed: dense, bitmask"):
        checkpoint.write_checkpoint(model, tokenizer, tmp_path / "x", None, {}, "zip")


def test_a_bias_pruning_added_ships_the_model_code_instead_of_being_dropped(make_config, tmp_path):
    model, tokenizer = tiny(make_config, "llama-tiny")
    arch = families.arch_for(model)
    for block in arch.blocks(model):  # FLAP's compensation: a down_proj bias LLaMA's class does not have
        arch.add_ffn_out_bias(block, torch.full((64,), 0.5))
    expected = logits(model)
    target = models.save(model, tokenizer, tmp_path / "ckpt")
    # before: a plain config, and from_pretrained silently dropped the biases (different logits)
    assert "auto_map" in json.loads((target / "config.json").read_text())
    reloaded, _ = reload_logits(target, tmp_path, remote_code=True)
    assert torch.equal(reloaded, expected)
