"""Data protocol details: the WikiText-2 join, calibration sampling, perplexity windows."""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import random

import datasets
import pytest
import torch

from bench import data, models, tokenization
from bench.core import perplexity
from bench.config import ModelConfig, PplConfig
from bench.data import DataUnavailable


def test_wikitext2_eval_text_matches_the_protocol_checksum(shared_data):
    corpus = data.load_corpus("wikitext2", "test", str(shared_data), "eval")
    assert len(corpus.text) == 1_294_336
    digest = hashlib.sha256(corpus.text.encode()).hexdigest()
    assert digest == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_eval_windows_are_contiguous_non_overlapping_and_drop_the_tail():
    ids = torch.arange(1000).unsqueeze(0)
    windows = tokenization.eval_windows(ids, 64, None, "wikitext2")
    assert windows.shape == (15, 64)  # 1000 // 64; the trailing 40 tokens are dropped
    assert torch.equal(windows.flatten(), torch.arange(960))
    assert tokenization.eval_windows(ids, 64, 3, "wikitext2").shape == (3, 64)
    assert tokenization.eval_windows(torch.arange(300 * 8).unsqueeze(0), 8, None, "c4").shape == (256, 8)
    with pytest.raises(ValueError, match="less than one window"):
        tokenization.eval_windows(ids, 2048, None, "wikitext2")


def test_calibration_sampling_is_seeded_and_slices_the_text():
    ids = torch.arange(5000).unsqueeze(0)
    first = tokenization.calibration_samples(ids, 8, 100, seed=0)
    assert torch.equal(first, tokenization.calibration_samples(ids, 8, 100, seed=0))
    assert not torch.equal(first, tokenization.calibration_samples(ids, 8, 100, seed=1))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 100)) for row in first)


def test_perplexity_is_exp_of_mean_window_nll():
    model, tokenizer = models.random_model(ModelConfig(
        name="t", source="random",
        architecture={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "num_key_value_heads": 1}))
    model.eval()
    windows = tokenization.eval_windows(tokenization.tokenize(tokenizer, "some text to score, " * 40), 32, 5, "pydoc")
    with torch.no_grad():  # independent reference: transformers' own shifted LM loss per window
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in windows]
    assert perplexity.perplexity(model, windows, "cpu") == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_missing_corpus_fails_loudly_unless_fallback_is_allowed(tmp_path):
    with pytest.raises(DataUnavailable, match="wiki.test.raw"):
        data.load_corpus("wikitext2", "test", str(tmp_path), "eval", allow_fallback=False)
    corpus = data.load_corpus("wikitext2", "test", str(tmp_path), "eval", allow_fallback=True)
    assert corpus.name == "pydoc" and corpus.fallback_for == "wikitext2"
    assert len(corpus.text) > 100_000


def _synthetic_c4(folder) -> list[str]:
    """A local C4 validation shard of 1500 seeded documents of 1-60 words."""
    rng = random.Random(5)
    words = "the a of pruning model sparse weight block layer token".split()
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(1500)]
    (folder / "c4").mkdir()
    with gzip.open(folder / "c4" / "c4-validation.00000-of-00008.json.gz", "wt") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in documents)
    return documents


def test_c4_is_read_as_its_description_says_and_its_document_samples_are_pinned(tmp_path):
    """C4's description: documents joined by " ", the first 1100 for evaluation, at most 256 windows, and
    the references' document sampler; the digest pins the sampler's draws (its use of the RNG)."""
    documents = _synthetic_c4(tmp_path)
    calib = data.load_corpus("c4", "validation", str(tmp_path), "calib")
    evaluation = data.load_corpus("c4", "validation", str(tmp_path), "eval")
    assert calib.text == " ".join(documents) and evaluation.text == " ".join(documents[:1100])
    assert calib.documents == documents == evaluation.documents
    tokenizer = models.byte_tokenizer()
    samples = tokenization.document_samples(tokenizer, calib.documents, 8, 64, seed=3)
    assert hashlib.sha256(samples.numpy().tobytes()).hexdigest()[:16] == "34543e53e4ab29f9"
    assert tokenization.eval_windows(tokenization.tokenize(tokenizer, evaluation.text), 8, None, "c4").shape == (256, 8)
    assert data.sampling("c4") == data.C4_SAMPLING and data.sampling("ptb") == data.STREAM_SAMPLING


@pytest.mark.parametrize("name, split, digest", [
    ("wikitext2", "validation", "df6adaeec3ba0667"), ("ptb", "validation", "b4e38910966e3fbf"),
    ("pydoc", "validation", "2c19f170cc5a2098")])
def test_window_samples_of_the_offline_corpora_are_pinned(shared_data, name, split, digest):
    corpus = data.load_corpus(name, split, str(shared_data), "calib")
    samples = tokenization.calibration_samples(tokenization.tokenize(models.byte_tokenizer(), corpus.text[:200_000]), 8, 128, 0)
    assert hashlib.sha256(samples.numpy().tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "pydoc"])
def test_the_byte_tokenizer_is_a_lookup_with_the_tokenizers_own_ids(shared_data, name, monkeypatch):
    """Tiny models tokenize each corpus through a table of byte ids instead of the tokenizer's call (seconds
    per corpus); the ids are the call's, byte for byte, also for text outside ASCII. A text holding the
    tokenizer's special token (one id for several bytes) goes through the call."""
    tokenizer = models.byte_tokenizer()
    corpus = data.load_corpus(name, "test", str(shared_data), "eval")
    texts = [corpus.text, "ünïcödé 😀\x00\t\r\n \u00ad\u2028 end", " leading space"]
    expected = [torch.tensor([tokenizer(text, return_attention_mask=False)["input_ids"]]) for text in texts]
    called = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *args, **kwargs: called.append(args))
    for text, ids in zip(texts, expected):
        assert torch.equal(tokenization.tokenize(tokenizer, text), ids)
    assert not called
    monkeypatch.undo()
    special = "a<eos>b"
    assert tokenization.tokenize(tokenizer, special).tolist() == [tokenizer(special)["input_ids"]]
    assert len(tokenization.tokenize(tokenizer, special)[0]) == 3


def test_each_corpus_loads_from_the_hub_as_its_description_says(monkeypatch):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["hub row"], "sentence": ["hub row"]}

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(data, "_hub_reachable", lambda: True)
    monkeypatch.delenv("PRUNEBENCH_DATA", raising=False)
    sources = [data.load_corpus(name, split, None, "calib").source
               for name, split in (("wikitext2", "test"), ("ptb", "train"), ("c4", "train"), ("c4", "test"))]
    assert sources == ["hub:wikitext-2-raw-v1", "hub:ptb_text_only", "hub:allenai/c4:en/c4-train.00000-of-01024.json.gz",
                       "hub:allenai/c4:en/c4-validation.00000-of-00008.json.gz"]
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
                     (("ptb_text_only", "penn_treebank"), {"split": "train"}),
                     (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}),
                     (("allenai/c4",), {"data_files": {"test": "en/c4-validation.00000-of-00008.json.gz"}, "split": "test"})]


def test_a_new_corpus_is_one_description(tmp_path, monkeypatch):
    """A corpus added to CORPORA loads, falls back and is a valid config value, with no other change."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "valid.txt").write_text("alpha beta\n gamma \n", encoding="utf-8")
    spec = data.CorpusSpec(files={"validation": "mine/valid.txt"}, read=lambda path: path.read_text().split("\n"),
                           calib_join="|", eval_join="#")
    monkeypatch.setitem(data.CORPORA, "mine", spec)
    assert data.load_corpus("mine", "validation", str(tmp_path), "calib").text == "alpha beta| gamma |"
    assert data.load_corpus("mine", "validation", str(tmp_path), "eval").text == "alpha beta# gamma #"
    assert data.load_corpus("mine", "test", str(tmp_path), "eval", allow_fallback=True).fallback_for == "mine"
    assert data.CalibConfig(dataset="mine").dataset == "mine" and PplConfig(datasets=["mine"]).datasets == ["mine"]
    allowed = ", ".join([*(name for name in data.CORPORA if name != "mine"), "mine", "custom"])  # mine listed last
    with pytest.raises(ValueError, match=f"dataset='nope' is not valid; allowed: {allowed}$"):
        data.load_corpus("nope", "test", None, "eval")
