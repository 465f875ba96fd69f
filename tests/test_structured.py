"""Structured FFN pruning (CFSP, Wanda-SP, Magnitude-SP, FLAP): allocation, physical removal, saving,
recovery, errors; on the tiny random OPT/BLOOM/LLaMA models."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from bench import models
from bench.core import engine
from bench.core import families as arch
from bench.cell import run_cell
from bench.config import ModelConfig
from bench.core.pruned_model import FFN_SIZES_KEY
from bench.core.vocab import ConfigError
from methods.allocators.cfsp_coarse import round_channels
from methods.recovery import lora_ranks
from methods import catalog, lifecycle
from tests.conftest import FAST_SPEED, TINY


def _pruned(make_config, *overrides):
    cfg, _ = make_config(*overrides, *TINY)
    model, tokenizer = models.load(cfg.model)
    samples = torch.randint(0, 256, (cfg.data.calib.nsamples, cfg.data.calib.seqlen), generator=torch.Generator().manual_seed(0))
    dense_sizes = arch.ffn_sizes(model)
    lifecycle.prune(model, catalog.build(cfg.method), samples, cfg.sparsity, "cpu")
    return cfg, model, tokenizer, dense_sizes


def test_round_channels_multiples_bounds_and_exact_mean():
    widths = [640] * 5  # 25 units of 128: 60% of them is a whole number
    keep = [0.2, 0.9, 1.0, 0.5, 0.4]  # mean 0.6
    kept = round_channels(widths, keep, unit=128, target=0.4)
    assert all(k % 128 == 0 and 128 <= k <= 640 for k in kept)
    assert sum(kept) == 0.6 * sum(widths)
    assert kept[2] >= kept[0]  # the ranking of the ideal keeps survives rounding


def test_round_channels_rejects_unit_wider_than_ffn_and_empty_blocks():
    with pytest.raises(ValueError, match="round_to=256 is larger than the smallest FFN width"):
        round_channels([192, 192], [0.5, 0.5], unit=256, target=0.5)
    with pytest.raises(ValueError, match="leaves zero FFN channels"):
        round_channels([128, 128], [0.1, 0.1], unit=64, target=0.9)


@pytest.mark.parametrize("model", ["opt-tiny", "bloom-tiny", "llama-tiny"])
def test_cfsp_kept_channels_are_multiples_and_average_to_target(model, make_config):
    _, pruned, _, dense = _pruned(make_config, f"model={model}", "method=cfsp", "method.round_to=32",
                                  "method.a=30", "sparsity=0.25")
    sizes = arch.ffn_sizes(pruned)
    assert all(size % 32 == 0 for size in sizes)
    assert sum(sizes) == 0.75 * sum(dense)
    family = arch.arch_for(pruned)
    for block, size in zip(family.blocks(pruned), sizes):  # consistent physical shapes
        for name in family.ffn_in:
            assert block.get_submodule(name).weight.shape[0] == size
        assert block.get_submodule(family.ffn_out).weight.shape[1] == size


@pytest.mark.parametrize("model", ["opt-tiny", "bloom-tiny", "llama-tiny"])
@pytest.mark.parametrize("method", ["cfsp", "wanda_sp", "magnitude_sp", "flap"])
def test_structured_pipeline_records_channels_params_and_speed(model, method, make_config, tmp_path):
    extra = ["method.round_to=16"] if method == "cfsp" else []
    cfg, resolved = make_config(f"model={model}", f"method={method}", "sparsity=0.4", *extra, *FAST_SPEED, *TINY)
    result = run_cell(cfg, resolved, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "ok", saved["error"]
    sparsity = result.sparsity
    assert abs(sparsity["ffn_channels_removed"] - 0.4) < 0.02
    assert 0 < sparsity["params_removed"] < sparsity["ffn_channels_removed"]  # attention/embeddings stay
    assert sparsity["params"]["pruned"] < sparsity["params"]["dense"]
    speed = saved["metrics"]["speed"]
    assert speed["prefill_speedup"] > 0 and speed["decode_speedup"] > 0
    assert 1 < saved["metrics"]["ppl"]["pydoc"] < 1e4


def test_global_selection_gives_heterogeneous_widths_at_the_target(make_config):
    _, pruned, _, dense = _pruned(make_config, "model=llama-tiny", "method=wanda_sp", "sparsity=0.5")
    sizes = arch.ffn_sizes(pruned)
    assert sum(dense) - sum(sizes) == round(0.5 * sum(dense))


@pytest.mark.parametrize("model,method", [("llama-tiny", "flap"), ("opt-tiny", "cfsp"), ("bloom-tiny", "wanda_sp")])
def test_save_and_reload_give_identical_logits(model, method, make_config, tmp_path):
    cfg, pruned, tokenizer, _ = _pruned(make_config, f"model={model}", f"method={method}", "sparsity=0.4",
                                        *(["method.round_to=16"] if method == "cfsp" else []))
    models.save(pruned, tokenizer, tmp_path / "ckpt")
    reloaded, _ = models.load(ModelConfig(name="reloaded", source="hub", path=str(tmp_path / "ckpt")))
    assert arch.ffn_sizes(reloaded) == arch.ffn_sizes(pruned)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)


def test_flap_compensation_keeps_the_mean_ffn_output(make_config):
    """Removing channels and folding their mean into the bias leaves the FFN output's mean unchanged
    for the very inputs the means were taken on: check on block 0 (its inputs are the dense ones)."""
    cfg, _ = make_config("model=llama-tiny", "method=flap", "sparsity=0.5", *TINY)
    model, _ = models.load(cfg.model)
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = engine.capture_inputs(model, samples, "cpu")
    mlp = model.model.layers[0].mlp

    def ffn_mean():
        captured = []
        handle = mlp.register_forward_hook(lambda m, i, o: captured.append(o.reshape(-1, o.shape[-1])))
        engine.run_block(model.model.layers[0], hidden, kwargs[0], "cpu")
        handle.remove()
        return torch.cat(captured).mean(0)

    before = ffn_mean()
    lifecycle.prune(model, catalog.build(cfg.method), samples, cfg.sparsity, "cpu")
    assert mlp.down_proj.bias is not None
    torch.testing.assert_close(ffn_mean(), before, atol=1e-5, rtol=1e-4)


def test_released_fine_score_is_the_activation_norm():
    """The released `three_w_one_wa` formula, evaluated literally, is a constant times the activation
    norm: its weight terms are normalized over each channel's own column (why fine_score=released)."""
    hidden, width = 16, 40
    down, up, gate = torch.randn(hidden, width), torch.randn(width, hidden), torch.randn(width, hidden)
    act = torch.rand(width) + 0.1
    under = down.abs() * act
    literal = ((under / under.sum(0)) + (up.t().abs() / up.t().abs().sum(0))
               + (gate.t().abs() / gate.t().abs().sum(0))) * act
    torch.testing.assert_close(literal.mean(0), 3 / hidden * act)


def test_paper_and_released_fine_scores_rank_channels_differently(make_config):
    paper = _pruned(make_config, "model=llama-tiny", "method=cfsp", "method.round_to=8", "sparsity=0.5")[1]
    released = _pruned(make_config, "model=llama-tiny", "method=cfsp", "method.round_to=8", "sparsity=0.5",
                       "method.fine_score=released")[1]
    assert arch.ffn_sizes(paper) == arch.ffn_sizes(released)  # same coarse allocation
    assert not torch.equal(paper.model.layers[0].mlp.down_proj.weight, released.model.layers[0].mlp.down_proj.weight)


def test_lora_recovery_merges_back_into_a_plain_smaller_model(make_config, tmp_path):
    cfg, resolved = make_config("model=llama-tiny", "method=cfsp", "method.round_to=16", "sparsity=0.4",
                                "recovery=ig_lora", "recovery.steps=4", "recovery.seqlen=32",
                                "recovery.lr=1e-2", "eval.speed=null", f"save_dir={tmp_path / 'ckpt'}", *TINY)
    result = run_cell(cfg, resolved, tmp_path)
    assert result.status == "ok", result.error
    recovery = result.recovery
    assert recovery["steps"] == 4 and recovery["trainable_params"] > 0
    assert len(recovery["ranks_per_block"]) == 2
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config[FFN_SIZES_KEY] == result.sparsity["ffn_sizes"]
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as checkpoint:
        assert not any("lora" in key for key in checkpoint.keys())


def test_ig_lora_ranks_follow_block_importance(make_config):
    cfg, _ = make_config("model=llama-tiny", *TINY)
    model, _ = models.load(cfg.model)
    ranks = lora_ranks(model, 8, [0.2, 0.6])
    assert ranks["model.layers.0.mlp.down_proj"] == 4 and ranks["model.layers.1.self_attn.q_proj"] == 12
    assert set(lora_ranks(model, 8, None).values()) == {8}


@pytest.mark.parametrize("override,message", [
    ("method.fine_score=best", "method.fine_score='best' is not valid; allowed: paper, released"),
    ("method.round_to=0", "method.round_to=0 is out of range"),
    ("recovery.name=qlora", "recovery.name='qlora' is not valid; allowed: none, lora, ig_lora"),
    ("recovery=lora recovery.steps=0", "recovery.steps=0 is out of range"),
    ("eval.speed.batch=0", "eval.speed.batch=0 is out of range"),
])
def test_bad_options_fail_at_config_time(override, message, make_config):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config("model=llama-tiny", "method=cfsp", *override.split(), *TINY)


def test_lora_recovery_of_an_unstructured_pruner_is_refused(make_config):
    with pytest.raises(ConfigError, match="recovery=lora merges LoRA updates into every weight.*sparsegpt"):
        make_config("model=llama-tiny", "method=sparsegpt", "recovery=lora", *TINY)


def test_wanda_sp_rejects_unknown_selection(make_config):
    with pytest.raises(ConfigError, match="method.selection='best' is not valid; allowed: global, per_block"):
        make_config("model=llama-tiny", "method=wanda_sp", "method.selection=best", *TINY)


def test_unknown_family_has_a_clear_error():
    class Config:
        model_type = "gpt2"

    class Model(torch.nn.Module):
        config = Config()

    with pytest.raises(ConfigError, match=r"^model_type='gpt2': found no list of decoder blocks .* needs an explicit "
                                          r"adapter in ARCHS of bench/core/families.py$"):
        arch.ffn_sizes(Model())


def test_sparsity_removing_a_whole_block_is_an_error(make_config):
    with pytest.raises(ValueError, match="leaves zero FFN channels"):
        _pruned(make_config, "model=llama-tiny", "method=cfsp", "method.round_to=64", "sparsity=0.9")


def test_speed_uses_the_cache_api_of_transformers_after_5_40(make_config, monkeypatch):
    """transformers drops `past_key_values` (argument and output) in 5.40, within what pyproject allows:
    here both names fail as they will then, and the decode still runs."""
    import warnings

    from transformers.utils.generic import ModelOutput

    from bench import speed
    from bench.speed import SpeedConfig

    def removed(self):
        raise AttributeError("past_key_values was removed in transformers 5.40")

    monkeypatch.setattr(ModelOutput, "past_key_values", property(removed))
    cfg, _ = make_config("model=llama-tiny", *TINY)
    model, _ = models.load(cfg.model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")  # the renamed argument warns, then goes
        result = speed.measure(model, model, SpeedConfig(prefill_seqlen=8, decode_tokens=2, repeats=1), "cpu")
    assert result["decode_speedup"] > 0


def test_the_speed_reference_is_loaded_again_not_a_copy_held_through_the_cell(make_config, tmp_path, monkeypatch):
    """A structured cell's dense speed reference is read from the model's source when the speed is measured:
    a copy held from the prune on was a second model in RAM beside the cell's work (128 GiB at 70B)."""
    from transformers import PreTrainedModel

    from bench import speed

    cfg, resolved = make_config("model=llama-tiny", "method=wanda_sp", "sparsity=0.4", *FAST_SPEED, *TINY)
    real_copy, real_measure, references = copy.deepcopy, speed.measure, []

    def no_model_copy(value, *args):
        assert not isinstance(value, PreTrainedModel), "the cell copied the whole model"
        return real_copy(value, *args)

    def measure(dense, pruned, *args, **kwargs):
        references.append(sum(p.numel() for p in dense.parameters()))
        return real_measure(dense, pruned, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copy)
    monkeypatch.setattr(speed, "measure", measure)
    result = run_cell(cfg, resolved, tmp_path)
    assert result.status == "ok", result.error
    assert references == [result.sparsity["params"]["dense"]] and result.metrics["speed"]["prefill_speedup"] > 0
