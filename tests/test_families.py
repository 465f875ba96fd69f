"""Any decoder: family adapters inferred from module names, per-block kwargs (Gemma's sliding and full
attention layers), layer-wise perplexity equal to the whole-model one, every claimed family through a
whole cell."""
from __future__ import annotations

import pytest
import torch

from bench import models
from bench.cell import run_cell
from bench.config import ConfigError, zoo_entry
from bench.core import engine, families, perplexity
from tests.conftest import FAST_SPEED, TINY, load_script

# family preset -> whether its FFN has a known shape (separate ffn_in linears) for structured pruning
FAMILY_PRESETS = {"opt-tiny": True, "bloom-tiny": True, "llama-tiny": True, "mistral-tiny": True,
                  "qwen2-tiny": True, "qwen3-tiny": True, "gemma2-tiny": True, "gemma3-tiny": True,
                  "phi3-tiny": False, "gptneox-tiny": True, "falcon-tiny": True,
                  "stablelm-tiny": True}


def _model(preset: str):
    return models.load(zoo_entry(preset))[0]


def test_inference_reproduces_the_former_hand_written_adapters():
    expected = {
        "opt-tiny": ("model.decoder.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                              ("self_attn.out_proj",), ("fc1",), ("fc2",)),
                     ("fc1",), "fc2", "model.decoder.final_layer_norm"),
        "bloom-tiny": ("transformer.h", (("self_attention.query_key_value",), ("self_attention.dense",),
                                         ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
                       ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "transformer.ln_f"),
        "llama-tiny": ("model.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                        ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
                       ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "model.norm"),
    }
    for preset, (blocks, groups, ffn_in, ffn_out, norm) in expected.items():
        arch = families.arch_for(_model(preset))
        assert (arch.blocks_path, arch.groups, arch.ffn_in, arch.ffn_out, arch.final_norm) == \
            (blocks, groups, ffn_in, ffn_out, norm), preset


def test_every_family_knows_its_ffn_width_key_and_the_block_of_every_tensor():
    """What checkpoints need (the config key of the FFN width; None where the config cannot set it) and
    `block_of`, the one reading of a name's block, hold for every family: block tensors get their index,
    the rest (embeddings, final norm, lm_head) none."""
    width_keys = {"opt-tiny": "ffn_dim", "bloom-tiny": None, "falcon-tiny": "ffn_hidden_size"}
    for preset in FAMILY_PRESETS:
        model = _model(preset)
        arch = families.arch_for(model)
        assert arch.width_key == width_keys.get(preset, "intermediate_size"), preset
        blocks = arch.blocks(model)
        if arch.width_key is not None:
            assert getattr(model.config, arch.width_key) == blocks[0].get_submodule(arch.ffn_out).in_features
        for index, block in enumerate(blocks):
            names = [f"{arch.block_name(index)}.{name}" for name, _ in block.named_parameters()]
            assert {families.block_of(name) for name in names} == {index}, preset
        outside = [name for name, _ in model.named_parameters() if not name.startswith(arch.blocks_path + ".")]
        assert outside and {families.block_of(name) for name in outside} == {None}, preset


def test_fused_projections_are_grouped_and_phi3_refuses_structured_pruning():
    phi3 = families.arch_for(_model("phi3-tiny"))
    assert phi3.groups == (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))
    with pytest.raises(ConfigError, match=r"^model_type='phi3' fuses its FFN input projections in "
                                          r"mlp.gate_up_proj: structured .* not supported"):
        phi3.check_structured()
    falcon = families.arch_for(_model("falcon-tiny"))
    assert falcon.groups[0] == ("self_attention.query_key_value",) and falcon.ffn_out == "mlp.dense_4h_to_h"


def test_a_family_whose_layers_cannot_be_inferred_fails_validation_naming_model_type(make_config):
    # GPT-2 keeps its projections in Conv1D modules, not nn.Linear: no role can be inferred
    with pytest.raises(ConfigError, match=r"^model_type='gpt2': cannot infer the linear roles of transformer.h.0 "
                                          r"\(no attention input, attention output, FFN input, FFN output linear\)"):
        make_config("model=llama-tiny", "model.architecture.model_type=gpt2", *TINY)
    with pytest.raises(ConfigError, match=r"^model.architecture.model_type='no_such_family' is not valid; allowed: .*llama"):
        make_config("model=llama-tiny", "model.architecture.model_type=no_such_family", *TINY)


@pytest.mark.parametrize("preset", ["gemma3-tiny", "gemma2-tiny", "llama-tiny", "bloom-tiny"])
def test_layer_wise_traversal_replays_the_models_own_hidden_states(preset):
    """Each block gets its own kwargs: Gemma's sliding-window blocks (window 16 < seqlen 48) and its
    full-attention block see different masks and rotary tables, so reusing block 0's kwargs would fail."""
    model = _model(preset)
    samples = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [model(row.unsqueeze(0), output_hidden_states=True).hidden_states for row in samples]
    outputs = {}
    engine.traverse(model, samples, "cpu", "diag", lambda view: outputs.__setitem__(view.index, view.outputs),
                    edits=False, desc="test")
    n = len(outputs)
    for index in range(n - 1):  # the model's last hidden state is after the final norm
        want = torch.cat([states[index + 1] for states in expected])
        torch.testing.assert_close(outputs[index], want, rtol=1e-5, atol=1e-5)


def test_gemma3_block0_kwargs_differ_by_layer_type():
    model = _model("gemma3-tiny")
    _, kwargs = engine.capture_inputs(model, torch.randint(0, 256, (1, 32)), "cpu")
    sliding, full = kwargs[0][1], kwargs[1][1]  # batch size 1
    assert kwargs[2][1]["attention_mask"] is sliding["attention_mask"]  # one tensor per layer type, not per block
    assert sliding["attention_mask"] is not full["attention_mask"]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # rope bases differ


@pytest.mark.parametrize("preset", ["llama-tiny", "opt-tiny", "bloom-tiny", "gemma3-tiny", "gemma2-tiny",
                                    "falcon-tiny"])
def test_layer_wise_perplexity_equals_the_whole_model(preset):
    model = _model(preset)
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    whole = perplexity.perplexity(model, windows, "cpu", layerwise=False)
    layerwise = perplexity.perplexity(model, windows, "cpu", layerwise=True)
    assert layerwise == pytest.approx(whole, rel=1e-6)
    assert perplexity.fits(model, "cpu")  # auto on CPU: the model is in host memory already


@pytest.mark.parametrize("preset", list(FAMILY_PRESETS))
def test_layer_wise_windows_batched_per_block_forward_give_each_window_its_own_numbers(preset, monkeypatch):
    """5 windows 2 at a time: two full chunks and a remainder, whose kwargs (masks, BLOOM's ALiBi, rotary
    tables) are captured for its own size."""
    model = _model(preset).eval()
    windows = torch.randint(0, 256, (5, 40), generator=torch.Generator().manual_seed(3))
    chunks = []
    run_block_form = engine.run_block_form
    monkeypatch.setattr(engine, "run_block_form", lambda block, inputs, kwargs, device: (
        chunks.append(sorted(kwargs)), run_block_form(block, inputs, kwargs, device))[1])
    one = perplexity.layerwise_window_nlls(model, windows, "cpu", batch=1)
    assert chunks and all(sizes == [1] for sizes in chunks)
    chunks.clear()
    batched = perplexity.layerwise_window_nlls(model, windows, "cpu", batch=2)
    assert chunks and all(sizes == [1, 2] for sizes in chunks)
    assert torch.equal(batched, one), (batched - one).abs().max()


def test_the_layer_wise_batch_benchmark_prints_each_batch_against_one_window_at_a_time(shared_data, capsys):
    load_script("bench_layerwise_ppl").main(["--model", "llama-tiny", "--windows", "5", "--seqlen", "32",
                                             "--batches", "1", "2", "--repeats", "1"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"1", "2"} and rows["1"][1] == "1.00"
    assert all(row[2] == "True" for row in rows.values())


@pytest.mark.parametrize("preset", list(FAMILY_PRESETS))
def test_every_claimed_family_runs_a_whole_cell(preset, make_config, tmp_path):
    cfg, resolved = make_config(f"model={preset}", "method=wanda", "sparsity=0.5", *TINY)
    result = run_cell(cfg, resolved, tmp_path / "u", rerun="all")
    assert result.status == "ok", result.error
    assert result.sparsity["measured"] == pytest.approx(0.5, abs=0.01)
    assert result.metrics["ppl"]["pydoc"] > 1
    # the speed stage runs on every family, at the fewest tokens (its defaults took ~22 of a cell's ~25 s)
    cfg, resolved = make_config(f"model={preset}", "method=wanda_sp", "sparsity=0.25", *TINY, *FAST_SPEED)
    result = run_cell(cfg, resolved, tmp_path / "s", rerun="all")
    if FAMILY_PRESETS[preset]:
        assert result.status == "ok", result.error
        assert result.sparsity["ffn_channels_removed"] == pytest.approx(0.25, abs=0.02)
        assert result.metrics["ppl"]["pydoc"] > 1
        assert result.metrics["speed"]["decode_tokens_per_s"]["pruned"] > 0
    else:
        assert result.status == "failed" and result.error.type == "ConfigError"
        assert "structured (FFN channel) pruning is not supported" in result.error.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_fails_the_cell_naming_the_key(make_config, tmp_path):
    cfg, resolved = make_config("model=llama-tiny", "method=magnitude", "device=cuda", *TINY)  # validates: sweeps
    result = run_cell(cfg, resolved, tmp_path, rerun="all")  # are checked on a submit host without GPUs
    assert result.status == "failed" and result.error.type == "ConfigError"
    assert result.error.message == "device='cuda' but no CUDA GPU is visible on this host; allowed here: cpu"


def test_a_post_layer_norm_opt_has_no_final_norm_and_still_scores_layer_wise():
    cfg = zoo_entry("opt-tiny")
    cfg.architecture = {**cfg.architecture, "do_layer_norm_before": False}  # as OPT-350m
    model = models.random_model(cfg)[0].eval()
    assert families.arch_for(model).final_norm is None
    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    assert perplexity.perplexity(model, windows, "cpu", layerwise=True) == \
        pytest.approx(perplexity.perplexity(model, windows, "cpu", layerwise=False), rel=1e-6)
