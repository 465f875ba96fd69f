"""Numbers you can trust: the same cell gives the same numbers however it runs, every result says which
protocol and hardware produced it, targets are checked at start, and the defects found in review stay
fixed."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from peft import get_peft_model
from tokenizers import Tokenizer, processors
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from bench import data, models, protocol, tokenization, zeroshot
from bench.cell import run_cell
from bench.config import ConfigError, ModelConfig, validate
from bench.core import records
from bench.core.metrics import metric
from methods import masks, recovery
from tests.conftest import ROOT, TINY, compose_config, run_py

CELL = ["model=llama-tiny", "method=sparsegpt", "sparsity=0.5", *TINY]


def _numbers(result: records.Result) -> dict:
    return {"metrics": result.metrics, "sparsity": result.sparsity, "protocol": result.protocol}


def test_a_cell_gives_identical_numbers_with_and_without_cache_in_process_and_under_the_local_launcher(
        make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    cfg, resolved = make_config(*CELL)
    torch.set_num_threads(1)  # a parent with another pool size: the cell sets its own (`threads`)
    cold = run_cell(cfg, resolved, tmp_path / "cold", cache=True)
    warm = run_cell(cfg, resolved, tmp_path / "warm", cache=True, rerun="all")
    off = run_cell(cfg, resolved, tmp_path / "off", cache=False, rerun="all")
    assert "tokens" in warm.cache["hits"] and "tokens" not in off.cache.get("hits", [])
    proc = run_py(["-m", "hydra/launcher=local", *CELL,
                   f"hydra.sweep.dir={tmp_path / 'sweep'}"], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the live status reaches the console, its end state before the table
    ended = proc.stdout.find("] 1 cells: 1 done, 0 running, 0 failed, 0 waiting")
    assert 0 <= ended < proc.stdout.find("| model |"), proc.stdout[-2000:]
    (launched,) = records.read_results(tmp_path / "sweep").records
    assert launched.ok and cold.ok, (launched.error, cold.error)
    for other in (warm, off, launched):
        assert _numbers(other) == _numbers(cold)  # exactly: every float, bit for bit
    for result in (cold, launched):
        hardware = result.provenance["hardware"]
        assert hardware["torch_threads"] == cfg.threads == 2
        assert hardware["mkl_cbwr"] == "AVX2" and hardware["cpu"] and hardware["blas"]


def test_threads_is_validated(make_config):
    with pytest.raises(ConfigError, match=r"threads=0 is out of range; allowed: an integer >= 1"):
        make_config(*CELL, "threads=0")


# --- the protocol fingerprint --------------------------------------------------------------------

def test_protocol_id_changes_with_what_papers_disagree_on_and_differences_are_named(make_config):
    quick, _ = make_config("model=smollm2-135m")
    paper, _ = make_config("model=smollm2-135m", "protocol=paper", "data=c4")
    ours = protocol.fingerprint(quick)
    assert len(ours["id"]) == 12 and ours["id"] == protocol.fingerprint(quick)["id"]
    assert ours["id"] != protocol.fingerprint(paper)["id"]
    assert ours["fields"]["model_prequantized"] == "Q4_1 GGUF, dequantized"
    differences = protocol.protocol_differences(ours["fields"], protocol.fields(paper)
                                                | {"model_prequantized": "none"})
    assert differences == ["calib_dataset wikitext2 vs c4", "calib_split validation vs train",
                           "calib_nsamples 32 vs 128", "calib_seqlen 512 vs 2048",
                           f"calib_sampling {data.STREAM_SAMPLING} vs {data.C4_SAMPLING}",
                           "eval_seqlen 512 vs 2048", "eval_windows 16 vs unset",
                           "model_prequantized Q4_1 GGUF, dequantized vs none"]


def test_a_preset_carries_the_paper_protocol_and_the_cell_records_the_differences(make_config, tmp_path):
    cfg, resolved = make_config(*CELL)
    resolved["paper_protocol"] = {"calib_dataset": "c4", "calib_seqlen": 64, "eval_bos": data.BOS_RULE}
    result = run_cell(cfg, resolved, tmp_path)
    assert result.ok, result.error
    assert result.protocol["id"] == protocol.fingerprint(cfg)["id"]
    assert result.protocol["paper_differences"] == ["calib_dataset pydoc vs c4"]
    zhang = validate(compose_config("experiment=zhang24_opt", "model=opt-125m", "method=sparsegpt"))
    assert zhang.data.calib.dataset == "c4" and zhang.data.calib.split == "train"


def test_an_unknown_paper_protocol_field_fails_at_start():
    with pytest.raises(ConfigError, match=r"paper_protocol\.calib_size is not a protocol field; allowed: calib_dataset"):
        validate(compose_config(*CELL, "+paper_protocol.calib_size=128"))


# --- paper protocols as the reference code runs them ---------------------------------------------

def _bos_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "<unk>": 1, **{word: i + 2 for i, word in enumerate("a b c d e f g h".split())}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


def test_tokenize_keeps_the_tokenizers_bos_as_the_references_do():
    ids = tokenization.tokenize(_bos_tokenizer(), "a b c")
    assert ids.tolist() == [[0, 2, 3, 4]]


def test_c4_calibration_takes_a_window_inside_one_document_longer_than_seqlen():
    tokenizer = _bos_tokenizer()
    documents = ["a b", "c d e f g h a b c d e f g h", "h g", "b c d e f g h a b c d e f g"]
    samples = tokenization.document_samples(tokenizer, documents, 6, 5, seed=0)
    assert samples.shape == (6, 5)
    streams = [tokenization.tokenize(tokenizer, d)[0].tolist() for d in documents[1::2]]
    for sample in samples.tolist():  # contiguous inside one long document, never across two
        assert any(any(s[i:i + 5] == sample for i in range(len(s) - 4)) for s in streams)
    assert torch.equal(samples, tokenization.document_samples(tokenizer, documents, 6, 5, seed=0))
    with pytest.raises(ValueError, match="none longer than data.calib.seqlen=50"):
        tokenization.document_samples(tokenizer, documents, 1, 50, seed=0)


def test_mask_counts_follow_the_references():
    scores = torch.arange(14, dtype=torch.float).view(2, 7)
    assert masks.lowest_fraction_mask(scores, 0.5, per_row=True).sum(1).tolist() == [3, 3]  # int(3.5), not 4
    assert masks.lowest_fraction_mask(scores, 0.5, per_row=False).sum() == 7
    assert masks.lowest_fraction_mask(scores, 0.3, per_row=False).sum() == 4  # int(4.2)
    assert masks.threshold_mask(scores, 0.3).sum() == 5  # <= sorted[int(4.2)]: SparseGPT's rule
    assert masks.threshold_mask(scores, 0.0).sum() == 0


# --- targets -------------------------------------------------------------------------------------

def _with_target(**target):
    base = {"model": "llama-tiny", "method": "sparsegpt", "sparsity": 0.5, "metric": "ppl/pydoc",
            "reported": 10.0, "tolerance": 0.1, "unit": "relative", **target}
    cfg = compose_config(*CELL)
    with open_dict(cfg):
        cfg.targets = [base]
    return cfg


@pytest.mark.parametrize("target,message", [
    ({"metric": "acc_avg_dropp"}, r"targets\[0\] \(llama-tiny sparsegpt 0.5 acc_avg_dropp\): metric='acc_avg_dropp' "
                                  r"is not known; allowed: ppl, acc, acc_norm, acc_avg, speedup, acc_avg_drop"),
    ({"unit": None}, r"targets\[0\] \(.*\): unit=None is not valid; allowed: relative, absolute"),
    ({"metric": "ppl/ptb"}, r"targets\[0\] \(.*ppl/ptb\): no configured eval produces ppl/ptb"),
    ({"metric": "acc_avg_drop"}, r"no configured eval produces acc_avg_drop; eval.zeroshot.tasks=None"),
    ({"metric": "speedup"}, r"no configured eval produces speedup; the speed-up is measured for structured pruners"),
])
def test_a_target_that_cannot_be_judged_fails_at_start(target, message):
    validate(_with_target())  # the base target is fine
    with pytest.raises(ConfigError, match=message):
        validate(_with_target(**target))


@pytest.mark.parametrize("experiment,overrides", [
    ("demo_tiny", ["model=llama-tiny", "method=wanda"]),
    ("self_pruner_llama2", ["sparsity=0.3"]),
    ("zhang24_opt", ["model=opt-125m", "method=loss_estimate"]),
    ("owl_llama", ["method=owl_wanda"]),
])
def test_shipped_presets_ask_only_for_metrics_their_evals_produce(experiment, overrides):
    cfg = compose_config(f"experiment={experiment}", *overrides)
    validate(cfg)
    assert all(t["unit"] in ("relative", "absolute") for t in cfg.targets)


def test_accuracy_drop_is_against_the_dense_result():
    def result(average):
        return records.Result("ok", "h", records.CellKey("m", "x", 0.5), metrics={"zeroshot": {"average": average}})
    assert result(0.60).value("acc_avg_drop", result(0.65)) == pytest.approx(5.0)
    assert result(0.60).value("acc_avg_drop", records.Result("ok", "h", records.CellKey("m", "dense", 0))) is None
    assert metric("acc_avg_drop").unit == "pp" and result(0.6).value("acc_avg_drop") is None


# --- defects found in review ---------------------------------------------------------------------

def test_a_second_flap_cell_runs_on_cached_dense_statistics(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    first_cfg, first = make_config("model=llama-tiny", "method=flap", "sparsity=0.3", "eval.speed=null", *TINY)
    second_cfg, second = make_config("model=llama-tiny", "method=flap", "sparsity=0.5", "eval.speed=null", *TINY)
    assert run_cell(first_cfg, first, tmp_path / "a", cache=True).ok
    cached = run_cell(second_cfg, second, tmp_path / "b", cache=True)
    assert cached.ok, cached.error
    assert "dense_state" in cached.cache["hits"]


def test_ig_lora_keeps_the_update_scaling_of_plain_lora():
    model, _ = models.load(ModelConfig(name="t", source="random", dtype="float32", architecture={
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}))
    options = recovery.RecoveryOptions(name="ig_lora", rank=8, alpha=16.0)
    ranks = recovery.lora_ranks(model, options.rank, [0.2, 1.0])
    assert sorted(set(ranks.values())) == [3, 13]
    peft_model = get_peft_model(model, recovery.lora_config(ranks, options))
    scalings = {m.r["default"]: m.scaling["default"] for m in peft_model.modules() if hasattr(m, "lora_A")}
    assert scalings == {3: pytest.approx(2.0), 13: pytest.approx(2.0)}


def test_a_user_checkpoint_is_named_after_its_folder_and_the_default_model_says_what_it_is(tmp_path):
    checkpoint = tmp_path / "my-finetune"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "llama"}')
    user = validate(compose_config(f"model.path={checkpoint}"))
    assert user.model.name == "my-finetune" and user.model.label is None
    named = validate(compose_config(f"model.path={checkpoint}", "model.name=mine"))
    assert named.model.name == "mine"
    default = validate(compose_config())
    assert default.model.name == "smollm2-135m" and "Q4_1" in default.model.label and "Instruct" in default.model.label
    assert OmegaConf.select(compose_config(), "model.label") == default.model.label


def test_offline_zero_shot_mirrors_are_labelled_as_mirrors(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(zeroshot, "load_tasks", lambda cfg: None)  # the label is under test, not lm-eval
    monkeypatch.setattr(zeroshot, "evaluate", lambda *args: {"tasks": {"boolq": {"value": 0.5}}, "average": 0.5})
    cfg, resolved = make_config(*CELL, "eval=[ppl,zeroshot]", "eval.zeroshot.tasks=[boolq]",
                                f"eval.zeroshot.include_path={tmp_path}", "eval.speed=null")
    result = run_cell(cfg, resolved, tmp_path / "cell")
    assert result.ok, result.error
    assert result.metrics["zeroshot"]["mirror"] is True and result.protocol["fields"]["zeroshot_mirror"] is True


def test_the_protocol_records_a_corpus_the_cell_fell_back_from(make_config, tmp_path):
    cfg, resolved = make_config(*CELL, "data=c4", f"data.dir={tmp_path}", "eval.ppl.datasets=[pydoc,ptb]")
    result = run_cell(cfg, resolved, tmp_path / "cell")
    assert result.ok, result.error
    fields = result.protocol["fields"]
    assert fields["calib_dataset"] == "pydoc (fallback for c4)" and fields["calib_sampling"] == data.STREAM_SAMPLING
    assert fields["eval_datasets"] == ["pydoc", "ptb(pydoc fallback)"]
    assert result.protocol["id"] == protocol.protocol_id(fields) != protocol.fingerprint(cfg)["id"]
