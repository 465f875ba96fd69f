"""Streaming big models: blocks loaded from safetensors shards when the engine reaches them give exactly
the in-memory result (weights and perplexity), while only one block is ever materialised."""
from __future__ import annotations

import torch
import transformers

import methods
from bench import data, models, streaming
from bench.core import engine, perplexity
from tests.conftest import TINY


def test_streamed_pruning_matches_in_memory_pruning(make_config, tmp_path, monkeypatch):
    cfg, _ = make_config("model=llama-tiny", "method=sparsegpt", "sparsity=0.5", *TINY)
    model, tokenizer = models.load(cfg.model)
    model.save_pretrained(tmp_path / "dense", max_shard_size="100KB")  # several shards, blocks split across
    assert len(list((tmp_path / "dense").glob("*.safetensors"))) > 2
    ids = data.tokenize(tokenizer, data.load_corpus("pydoc", "validation", None, "calib").text)
    samples = data.calibration_samples(ids, 4, 64, seed=0)
    windows = data.eval_windows(data.tokenize(tokenizer, data.load_corpus("pydoc", "test", None, "eval").text),
                                64, 4, "pydoc")

    engine.prune(model, methods.build(cfg.method), samples, 0.5, "cpu")
    expected_ppl = perplexity.perplexity(model, windows, "cpu")

    loaded = []
    original_load = streaming.BlockStream.load

    def spy(self, index, block):
        loaded.append(sum(not p.is_meta for b in self.arch.blocks(self.model) for p in b.parameters()))
        original_load(self, index, block)

    monkeypatch.setattr(streaming.BlockStream, "load", spy)
    stream = streaming.prune_streamed(tmp_path / "dense", tmp_path / "pruned", methods.build(cfg.method),
                                      samples, 0.5)
    assert loaded == [0, 0]  # no other block is in memory when a block is loaded
    assert abs(stream.sparsity - 0.5) < 0.01

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert streaming.streamed_perplexity(tmp_path / "pruned", windows) == expected_ppl
