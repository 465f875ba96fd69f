"""Checkpoints any tool can load: each is reloaded with plain transformers (in a fresh interpreter that
cannot import prunebench, or in-process for the sweep over every family) and must give the same logits
bit for bit; prunebench's own loader must too."""
from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
import yaml
from safetensors import safe_open

from bench import checkpoint, models
from bench.cell import run_cell
from bench.config import ConfigError, ModelConfig
from bench.core import families, pruned_model, records
from methods import catalog, lifecycle
from tests.conftest import ROOT, TINY, run_py
from tests.test_families import FAMILY_PRESETS

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


def load_with_prunebench(directory: Path):
    return models.load(ModelConfig(name="reloaded", source="hub", path=str(directory)))[0]


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


@pytest.mark.parametrize("name,width_key", [("llama-tiny", "intermediate_size"), ("opt-tiny", "ffn_dim"),
                                            ("falcon-tiny", "ffn_hidden_size")])
def test_uniform_width_loads_with_plain_from_pretrained(make_config, tmp_path, name, width_key):
    model, tokenizer = tiny(make_config, name)
    shrink(model, [128, 128])
    expected = logits(model)
    target = models.save(model, tokenizer, tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    # before: the dense width and a prunebench-only key; from_pretrained failed with a size mismatch
    assert config[width_key] == 128 and pruned_model.FFN_SIZES_KEY not in config and "auto_map" not in config
    assert config["use_cache"] is True and model.config.use_cache is False  # the in-memory model is untouched
    reloaded, printed = reload_logits(target, tmp_path, remote_code=False)
    assert torch.equal(reloaded, expected), printed
    assert printed.endswith("True")


@pytest.mark.parametrize("name", ["llama-tiny", "bloom-tiny"])
def test_per_block_widths_load_with_the_shipped_model_code(make_config, tmp_path, name, capfd):
    model, tokenizer = tiny(make_config, name)
    shrink(model, [100, 150] if name == "llama-tiny" else [128, 128])  # BLOOM's config cannot say 128
    expected = logits(model)
    target = models.save(model, tokenizer, tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_prunebench.PrunedConfig",
                                  "AutoModelForCausalLM": "modeling_prunebench.PrunedForCausalLM"}
    assert (target / checkpoint.MODELING_FILE).exists()
    reloaded, printed = reload_logits(target, tmp_path, remote_code=True)
    assert torch.equal(reloaded, expected) and printed.startswith("PrunedForCausalLM")
    capfd.readouterr()
    assert torch.equal(logits(load_with_prunebench(target)), expected)
    said = "".join(capfd.readouterr())
    assert "custom code" not in said and "model of type" not in said  # before: the trust_remote_code prompt


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
    assert config[pruned_model.SPARSITY_KEY]["format"] == "sparse-bitmask"
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
    unpacked = pruned_model.decompress({f"w.{part}": value for part, value in packed.items()} | {"b": weight[0]})
    assert unpacked.keys() == {"w.weight", "b"} and torch.equal(unpacked["w.weight"], weight)


def test_a_cell_saves_its_recipe_and_record(make_config, tmp_path):
    cfg, resolved = make_config("model=llama-tiny", "method=wanda", "method.sparsity_type=2:4", *TINY,
                                f"save_dir={tmp_path / 'ckpt'}", "save_format=bitmask")
    result = run_cell(cfg, resolved, tmp_path / "cell")
    assert result.status == "ok", result.error
    saved = Path(result.saved_to)
    recipe = yaml.safe_load((saved / checkpoint.CONFIG_FILE).read_text())
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


def test_the_shipped_model_code_imports_nothing_of_prunebench():
    tree = ast.parse(inspect.getsource(pruned_model))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    # the tail names the family's classes; accelerate and huggingface_hub come with transformers' device_map and hub
    assert imported == {"pathlib", "numpy", "torch", "safetensors", "accelerate", "huggingface_hub"}


LOAD_AS_TRANSFORMERS = """
import json, sys, torch, transformers
ids = torch.load(sys.argv[3])
for i, kwargs in enumerate(json.loads(sys.argv[2])):
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, **kwargs)
    with torch.no_grad():
        torch.save(model(ids).logits, f"{sys.argv[4]}.{i}")
    print(json.dumps({"dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                      "device_map": getattr(model, "hf_device_map", None), "widths": model.config.prunebench_ffn_sizes}))
"""


def load_as_transformers(where: str, tmp_path: Path, *variants: dict, env: dict = {}) -> list[tuple[torch.Tensor, dict]]:
    """Logits and what the model looks like, loaded by plain transformers with each variant of
    from_pretrained's arguments in turn (one fresh interpreter, no prunebench)."""
    torch.save(IDS, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"} | env
    run = subprocess.run([sys.executable, "-c", LOAD_AS_TRANSFORMERS, where, json.dumps(variants),
                          str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = [json.loads(line) for line in run.stdout.strip().splitlines()[-len(variants):]]
    return [(torch.load(tmp_path / f"logits.pt.{i}"), looks) for i, looks in enumerate(seen)]


def bf16_per_block_checkpoint(make_config, target: Path, save_format: str = "dense"):
    cfg, _ = make_config("model=llama-tiny", "model.dtype=bfloat16", *TINY)
    model, tokenizer = models.load(cfg.model)
    shrink(model, [100, 150])
    if save_format == "bitmask":
        two_four(model)
    return logits(model), models.save(model, tokenizer, target, save_format=save_format)


@pytest.mark.parametrize("save_format", ["dense", "bitmask"])
def test_the_shipped_model_code_honours_dtype_auto_and_device_map_auto(make_config, tmp_path, save_format):
    """Before: the shipped code globbed the weights into host RAM, ignored device_map and built float32
    whatever the checkpoint's dtype ("auto", transformers' default, gave float32 here)."""
    expected, target = bf16_per_block_checkpoint(make_config, tmp_path / "ckpt", save_format)
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    (got, seen), (default, seen_default), (wide, seen_wide) = load_as_transformers(
        str(target), tmp_path, {"dtype": "auto", "device_map": "auto"},
        {},  # no dtype: "auto", as for any transformers model
        {"dtype": "float32", "device_map": {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                            "model.rotary_emb": "cpu", "lm_head": "cpu"}})
    assert seen["dtypes"] == ["torch.bfloat16"] and seen["widths"] == [100, 150]
    assert seen["device_map"] == {"": "cpu"}  # accelerate's map of this machine: no GPU here
    assert torch.equal(got, expected)
    assert seen_default["dtypes"] == ["torch.bfloat16"] and seen_default["device_map"] is None
    assert torch.equal(default, expected)
    assert seen_wide["dtypes"] == ["torch.float32"] and torch.allclose(wide, expected.float(), atol=0.05)


def test_the_shipped_model_code_loads_from_a_hub_repo_id(make_config, tmp_path, monkeypatch):
    """Before: prunebench's own loader (model.id=<org>/<name>) globbed a local folder of that name and found no
    weights (AutoModelForCausalLM hands the shipped code the snapshot's folder)."""
    expected, target = bf16_per_block_checkpoint(make_config, tmp_path / "ckpt")
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--prunebench--llama-tiny-pruned"
    shutil.copytree(target, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    [(got, seen)] = load_as_transformers("prunebench/llama-tiny-pruned", tmp_path, {"dtype": "auto"},
                                         env={"HF_HUB_CACHE": str(cache)})
    assert torch.equal(got, expected) and seen["widths"] == [100, 150]
    # read when huggingface_hub was imported, before the fixture set HF_HUB_OFFLINE (else it waits on the network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ours = models.load(ModelConfig(name="hub", source="hub", id="prunebench/llama-tiny-pruned", dtype="bfloat16"))[0]
    assert torch.equal(logits(ours), expected)


def pruned(make_config, preset: str, *overrides: str):
    cfg, _ = make_config(f"model={preset}", *overrides, *TINY)
    model, tokenizer = models.load(cfg.model)
    samples = torch.randint(0, 256, (cfg.data.calib.nsamples, cfg.data.calib.seqlen),
                            generator=torch.Generator().manual_seed(0))
    lifecycle.prune(model, catalog.build(cfg.method), samples, cfg.sparsity, "cpu")
    return model, tokenizer


@pytest.mark.parametrize("preset", list(FAMILY_PRESETS))
def test_every_family_that_prunes_saves_checkpoints_that_reload_exactly(preset, make_config, tmp_path):
    """Before: every family but OPT, BLOOM and LLaMA failed to save a structured or bitmask checkpoint
    (KeyError on its model_type), after the whole prune. A family whose FFN input is fused (Phi-3) is
    never pruned structurally, so it saves the bitmask checkpoint alone."""
    cases = {"bitmask": ("method=wanda", "method.sparsity_type=2:4")}
    if FAMILY_PRESETS[preset]:
        cases["structured"] = ("method=cfsp", "sparsity=0.4", "method.round_to=1")
    for kind, overrides in cases.items():
        model, tokenizer = pruned(make_config, preset, *overrides)
        if kind == "structured":
            assert len(set(families.ffn_sizes(model))) > 1  # per-block widths: the shipped model code
        expected, state = logits(model), model.state_dict()
        target = models.save(model, tokenizer, tmp_path / f"{preset}-{kind}",
                             save_format="bitmask" if kind == "bitmask" else "dense")
        assert json.loads((target / "config.json").read_text())["auto_map"] == checkpoint.AUTO_MAP
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True)
        assert type(reloaded).__name__ == "PrunedForCausalLM" and isinstance(reloaded, type(model))
        assert reloaded.state_dict().keys() == state.keys(), kind
        assert all(torch.equal(tensor, state[name]) for name, tensor in reloaded.state_dict().items()), kind
        assert torch.equal(logits(reloaded), expected), kind
        assert torch.equal(logits(load_with_prunebench(target)), expected), kind


def test_run_py_saves_a_structured_qwen2_that_reloads(tmp_path):
    """Before: the cell pruned the whole model, then failed with KeyError: 'qwen2' and lost its result."""
    command = ["model=qwen2-tiny", "method=cfsp", "sparsity=0.4", "method.round_to=1", f"save_dir={tmp_path / 'ckpt'}"]
    proc = run_py([*command, "cache=false", "eval.speed=null", *TINY,
                   f"hydra.run.dir={tmp_path / 'run'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = records.read_result(tmp_path / "run" / records.RESULT_FILE)
    assert result.status == "ok" and result.saved_to == str(tmp_path / "ckpt")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(result.saved_to, trust_remote_code=True)
    assert families.ffn_sizes(reloaded) == result.sparsity["ffn_sizes"]
    assert torch.equal(logits(reloaded), logits(load_with_prunebench(Path(result.saved_to))))


def test_the_saved_config_is_named_for_what_it_is_and_the_readme_command_replays_it(tmp_path):
    # before: `recipe.yaml`, which llm-compressor's oneshot(recipe=...) cannot read, and no replay command
    made = run_py(["model=llama-tiny", "method=wanda", "threads=1", "cache=false",
                   "eval.speed=null", *TINY, f"save_dir={tmp_path / 'ckpt'}", f"hydra.run.dir={tmp_path / 'run'}"], timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    assert not (tmp_path / "ckpt" / "recipe.yaml").exists()
    command = next(line.strip() for line in (ROOT / "README.md").read_text().splitlines()
                   if "--config-name prunebench_config" in line).split()
    assert command[:2] == ["python", "run.py"]
    command = [a.replace("<dir>", str(tmp_path / "ckpt")) for a in command[2:]]
    replayed = run_py([*command, f"hydra.run.dir={tmp_path / 'replay'}"], timeout=300)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    first, again = (records.read_result(tmp_path / d / records.RESULT_FILE) for d in ("run", "replay"))
    assert again.metrics == first.metrics and again.config_hash == first.config_hash
    assert again.saved_to is None  # the replay leaves the checkpoint it read alone
