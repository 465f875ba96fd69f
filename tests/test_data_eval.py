"""Data protocol details: the WikiText-2 join, calibration sampling, perplexity windows."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from bench import data, models
from bench.core import perplexity
from bench.config import ModelConfig
from bench.data import DataUnavailable


def test_wikitext2_eval_text_matches_the_protocol_checksum(shared_data):
    corpus = data.load_corpus("wikitext2", "test", str(shared_data), "eval")
    assert len(corpus.text) == 1_294_336
    digest = hashlib.sha256(corpus.text.encode()).hexdigest()
    assert digest == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_eval_windows_are_contiguous_non_overlapping_and_drop_the_tail():
    ids = torch.arange(1000).unsqueeze(0)
    windows = data.eval_windows(ids, 64, None, "wikitext2")
    assert windows.shape == (15, 64)  # 1000 // 64; the trailing 40 tokens are dropped
    assert torch.equal(windows.flatten(), torch.arange(960))
    assert data.eval_windows(ids, 64, 3, "wikitext2").shape == (3, 64)
    assert data.eval_windows(torch.arange(300 * 8).unsqueeze(0), 8, None, "c4").shape == (256, 8)
    with pytest.raises(ValueError, match="less than one window"):
        data.eval_windows(ids, 2048, None, "wikitext2")


def test_calibration_sampling_is_seeded_and_slices_the_text():
    ids = torch.arange(5000).unsqueeze(0)
    first = data.calibration_samples(ids, 8, 100, seed=0)
    assert torch.equal(first, data.calibration_samples(ids, 8, 100, seed=0))
    assert not torch.equal(first, data.calibration_samples(ids, 8, 100, seed=1))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 100)) for row in first)


def test_perplexity_is_exp_of_mean_window_nll():
    model, tokenizer = models.random_model(ModelConfig(
        name="t", source="random",
        architecture={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "num_key_value_heads": 1}))
    model.eval()
    windows = data.eval_windows(data.tokenize(tokenizer, "some text to score, " * 40), 32, 5, "pydoc")
    with torch.no_grad():  # independent reference: transformers' own shifted LM loss per window
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in windows]
    assert perplexity.perplexity(model, windows, "cpu") == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_missing_corpus_fails_loudly_unless_fallback_is_allowed(tmp_path):
    with pytest.raises(DataUnavailable, match="wiki.test.raw"):
        data.load_corpus("wikitext2", "test", str(tmp_path), "eval", allow_fallback=False)
    corpus = data.load_corpus("wikitext2", "test", str(tmp_path), "eval", allow_fallback=True)
    assert corpus.name == "pydoc" and corpus.fallback_for == "wikitext2"
    assert len(corpus.text) > 100_000
