"""Your own corpus (`custom`): text and JSON files through the `datasets` loaders, for calibration and
perplexity, with one-line errors naming the config key."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

from bench import data, models, tokenization


@pytest.fixture
def text_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first line of a\nsecond line of a\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("only line of b\n\nafter a blank line\n", encoding="utf-8")
    (folder / "notes.md").write_text("not matched by *.txt\n", encoding="utf-8")
    return folder


def test_text_glob_reads_every_line_of_every_matched_file(text_files):
    corpus = data.load_custom(str(text_files / "**" / "*.txt"), "validation", "text", label="mine")
    assert corpus.text == ("first line of a\nsecond line of a\n"
                           "only line of b\n\nafter a blank line")
    assert corpus.name == "mine" and corpus.split == "validation"
    assert "a.txt" in corpus.source and "b.txt" in corpus.source and "notes.md" not in corpus.source
    assert corpus.key.startswith("data.path=")


def test_text_list_of_paths_and_load_corpus_dispatch(text_files):
    paths = [str(text_files / "sub" / "b.txt"), str(text_files / "a.txt")]
    corpus = data.load_corpus("custom", "test", None, "eval", allow_fallback=True, path=paths, fmt="text")
    assert corpus.text.startswith("only line of b") and corpus.text.endswith("second line of a")
    assert corpus.fallback_for is None


def test_json_lines_field_and_gzip(tmp_path):
    records = [{"id": 1, "body": "alpha beta"}, {"id": 2, "body": "gamma delta"}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": 3, "body": "epsilon"}) + "\n")
    corpus = data.load_custom([str(tmp_path / "docs.jsonl"), str(tmp_path / "more.jsonl.gz")], "test", "json",
                              field="body")
    assert corpus.text == "alpha beta\n\ngamma delta\n\nepsilon"
    with pytest.raises(ValueError, match=r"data.field='text' is not a column .*columns: id, body"):
        data.load_custom(str(tmp_path / "docs.jsonl"), "test", "json", field="text")
    with pytest.raises(ValueError, match=r"data.field='id' .* holds a int, not text"):
        data.load_custom(str(tmp_path / "docs.jsonl"), "test", "json", field="id")


def test_a_mapping_keeps_calibration_and_evaluation_files_apart(tmp_path):
    (tmp_path / "calib.txt").write_text("calibration text\n", encoding="utf-8")
    (tmp_path / "held.txt").write_text("held-out text\n", encoding="utf-8")
    path = {"validation": str(tmp_path / "calib.txt"), "test": str(tmp_path / "held.txt")}
    assert data.load_custom(path, "validation", "text").text == "calibration text"
    assert data.load_custom(path, "test", "text").text == "held-out text"
    with pytest.raises(ValueError, match=r"^data.path.train is not set"):
        data.load_custom(path, "train", "text")
    with pytest.raises(ValueError, match=r"data.path has split keys \['dev'\]"):
        data.load_custom({"dev": str(tmp_path / "calib.txt")}, "test", "text")


def test_a_path_that_matches_nothing_names_the_key(tmp_path):
    missing = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(ValueError, match=r"^data.path='.*nowhere/\*.txt' matches no file$"):
        data.load_custom(missing, "test", "text")
    with pytest.raises(ValueError, match=r"^data.path.test='.*nope.txt' matches no file$"):
        data.load_custom({"test": str(tmp_path / "nope.txt")}, "test", "text")
    with pytest.raises(ValueError, match=r"^data.path is not set"):
        data.load_corpus("custom", "test", None, "eval", path=None)
    with pytest.raises(ValueError, match=r"^data.format='csv' is not valid; allowed: text, json$"):
        data.load_custom(str(tmp_path), "test", "csv")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hold no text"):
        data.load_custom(str(tmp_path / "empty.txt"), "test", "text")


def test_too_short_corpus_fails_for_calibration_and_evaluation(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 300 + "\n", encoding="utf-8")  # 300 byte tokens
    corpus = data.load_custom(str(tmp_path / "short.txt"), "validation", "text")
    ids = tokenization.tokenize(models.byte_tokenizer(), corpus.text)
    assert ids.shape[1] == 300
    with pytest.raises(ValueError, match=(r"^data.path='.*short.txt': 300 tokens, fewer than "
                                          r"data.calib.nsamples x data.calib.seqlen = 8 x 64 = 512")):
        tokenization.calibration_samples(ids, 8, 64, seed=0, key=corpus.key)
    assert tokenization.calibration_samples(ids, 4, 64, seed=0, key=corpus.key).shape == (4, 64)
    with pytest.raises(ValueError, match=r"^data.path='.*short.txt': 300 tokens is less than one window of "
                                         r"eval.ppl.seqlen=512$"):
        tokenization.eval_windows(ids, 512, None, corpus.name, key=corpus.key)
    assert tokenization.eval_windows(ids, 100, None, corpus.name, key=corpus.key).shape == (3, 100)


def test_custom_corpus_calibrates_and_scores_a_model(tmp_path):
    from bench.config import ModelConfig
    from bench.core import perplexity

    (tmp_path / "own.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    model, tokenizer = models.random_model(ModelConfig(
        name="t", source="random",
        architecture={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "num_key_value_heads": 1}))
    calib = data.load_corpus("custom", "validation", None, "calib", path=str(tmp_path / "*.txt"))
    ids = tokenization.tokenize(tokenizer, calib.text)
    samples = tokenization.calibration_samples(ids, 4, 64, seed=0, key=calib.key)
    assert samples.shape == (4, 64)
    windows = tokenization.eval_windows(ids, 64, 5, calib.name, key=calib.key)
    assert torch.isfinite(torch.tensor(perplexity.perplexity(model.eval(), windows, "cpu")))


@pytest.mark.parametrize("group, fmt", [("text", "text"), ("json", "json")])
def test_data_groups_compose(group, fmt):
    from tests.conftest import compose_config

    cfg = compose_config(f"data={group}", "data.path=/x/*.txt", "data.name=mine",
                         "eval.ppl.datasets=[wikitext2,custom]")
    assert cfg.data.calib.dataset == "custom" and cfg.data.format == fmt
    assert cfg.data.path == "/x/*.txt" and cfg.data.field == "text" and cfg.data.name == "mine"
    assert cfg.data.allow_fallback is False
    assert list(cfg.eval.ppl.datasets) == ["wikitext2", "custom"]


def test_a_missing_corpus_path_fails_validation_naming_the_key(make_config, tmp_path):
    from bench.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data.path='.*nowhere.txt' matches no file$"):
        make_config("model=llama-tiny", "data=text", f"data.path={tmp_path}/nowhere.txt")
    with pytest.raises(ConfigError, match=r"^data.format='csv' is not valid"):
        make_config("model=llama-tiny", "data=text", "data.format=csv", f"data.path={tmp_path}")


def test_a_custom_corpus_cell_calibrates_and_scores(make_config, tmp_path):
    from bench.cell import run_cell

    (tmp_path / "own.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    cfg, resolved = make_config("model=llama-tiny", "method=wanda", "data=text", f"data.path={tmp_path}/own.txt",
                                "data.name=fox", "eval.ppl.datasets=[custom]", "data.calib.nsamples=4",
                                "data.calib.seqlen=64", "eval.ppl.seqlen=64", "eval.ppl.max_windows=4")
    result = run_cell(cfg, resolved, tmp_path / "out")
    assert result.status == "ok", result.error
    assert result.data["calib"]["dataset"] == "fox" and result.data["eval"]["custom"]["windows"] == 4
    assert result.metrics["ppl"]["custom"] > 1


def test_a_too_short_custom_corpus_fails_the_cell_naming_the_key(make_config, tmp_path):
    from bench.cell import run_cell

    (tmp_path / "short.txt").write_text("x" * 100 + "\n", encoding="utf-8")
    cfg, resolved = make_config("model=llama-tiny", "method=wanda", "data=text", f"data.path={tmp_path}/short.txt",
                                "eval.ppl.datasets=[custom]", "data.calib.nsamples=4", "data.calib.seqlen=64",
                                "eval.ppl.seqlen=64")
    result = run_cell(cfg, resolved, tmp_path / "out")
    assert result.status == "failed"
    assert result.error.message.startswith("data.path=") and "fewer than data.calib.nsamples" in result.error.message
