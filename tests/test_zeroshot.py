"""Zero-shot evaluation through lm-eval on offline task mirrors (no hub), and its config validation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from bench.cell import run_cell
from bench.core.vocab import ConfigError
from reports.collect import collect
from tests.conftest import ROOT, TINY, load_script, run_py

TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "rte"]


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory):
    return load_script("zeroshot_mirrors").write_mirrors(tmp_path_factory.mktemp("mirrors"), n=6)


def test_mirrors_are_in_each_tasks_schema(mirrors):
    for task in TASKS:
        docs = [json.loads(line) for line in (mirrors / f"{task}.jsonl").read_text().splitlines()]
        assert len(docs) == 6
        if task in ("arc_easy", "arc_challenge", "openbookqa"):
            assert all(doc["answerKey"] in doc["choices"]["label"] for doc in docs)
        if task == "winogrande":
            assert all(len(doc["contexts"]) == 2 and doc["label"] in (0, 1) for doc in docs)


def test_cell_scores_every_task_on_local_mirrors(mirrors, make_config, tmp_path):
    cfg, resolved = make_config("model=llama-tiny", "method=magnitude", "sparsity=0.5", *TINY,
                                "eval=[ppl,zeroshot]", f"eval.zeroshot.tasks=[{','.join(TASKS)}]",
                                "eval.zeroshot.limit=4", f"eval.zeroshot.include_path={mirrors}",
                                "eval.zeroshot.log_samples=true")
    result = run_cell(cfg, resolved, tmp_path)
    assert result.status == "ok", result.error
    assert "pydoc" in result.metrics["ppl"]  # ppl and zeroshot compose
    zs = result.metrics["zeroshot"]
    assert set(zs["tasks"]) == set(TASKS)
    for task, scores in zs["tasks"].items():
        assert scores["samples"] == 4
        assert scores["metric"] == cfg.eval.zeroshot.metric[task]
        assert scores["value"] == scores[scores["metric"]]
        assert scores["value"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # a fraction of 4 examples
        assert scores["version"] is not None
    assert zs["average"] == pytest.approx(sum(t["value"] for t in zs["tasks"].values()) / len(TASKS))
    assert zs["lm_eval"].startswith("0.4.") and str(mirrors) in zs["source"]
    # lm-eval's own results JSON and samples beside result.json, with the same numbers, in a folder named
    # after the cell (before: a random id, with an empty model name in the JSON)
    own = json.loads(next((tmp_path / "lm_eval" / tmp_path.name).glob("results_*.json")).read_text())
    assert own["model_name"] == tmp_path.name
    # the mirrors under their own names: lm-eval's files never pass them off as the benchmarks
    assert own["results"]["piqa_mirror"]["acc,none"] == zs["tasks"]["piqa"]["acc"]
    assert set(own["results"]) == set(own["configs"]) == {f"{task}_mirror" for task in TASKS}
    assert own["configs"]["piqa_mirror"]["task"] == "piqa_mirror"
    assert {(s["name"], s["alias"]) for s in own["results"].values()} == {(f"{t}_mirror",) * 2 for t in TASKS}
    wide = collect(tmp_path, formats=("csv",)).written
    header = next(p for p in wide if p.name == "table_wide.csv").read_text().splitlines()[0]
    assert "50% acc/piqa (mirror) mean" in header and "acc/piqa mean" not in header  # before: the benchmark's
    samples = list((tmp_path / "lm_eval").rglob("samples_*.jsonl"))
    assert len(samples) == len(TASKS) and all("_mirror_" in path.name for path in samples)


@pytest.mark.parametrize("override, message", [
    ("+eval.zeroshot.metric.lambada_openai=acc", "eval.zeroshot.metric='lambada_openai'"),  # lm-eval's metric
    ("eval.zeroshot.tasks=[piqa,'']", "eval.zeroshot.tasks=''"),
    ("eval.zeroshot.metric.boolq=acc_norm", "eval.zeroshot.metric.boolq='acc_norm'"),
    ("eval.zeroshot.metric.piqa=f1", "eval.zeroshot.metric.piqa='f1'"),
    ("eval.zeroshot.limit=0", "eval.zeroshot.limit=0"),
])
def test_bad_zeroshot_config_fails_naming_the_key(override, message, make_config):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        make_config("model=llama-tiny", *TINY, "eval=[ppl,zeroshot]", override)


def test_any_task_lm_eval_resolves_scored_by_its_primary_metric_and_no_samples_by_default(mirrors, make_config,
                                                                                          tmp_path):
    import yaml

    # a task outside the papers' eight (before: refused), shaped like lambada: perplexity listed first
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for path in mirrors.iterdir():
        (tasks / path.name).write_bytes(path.read_bytes())
    (tasks / "cloze.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x): return", "target": " x"}) + "\n"
                                               for i in range(4)))
    (tasks / "cloze.yaml").write_text(yaml.safe_dump({
        "task": "cloze", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tasks / "cloze.jsonl")}},
        "output_type": "loglikelihood", "test_split": "test", "doc_to_text": "{{text}}", "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))
    cfg, resolved = make_config("model=llama-tiny", "method=magnitude", "sparsity=0.5", *TINY,
                                "eval=[ppl,zeroshot]", "eval.zeroshot.tasks=[piqa,cloze]", "eval.zeroshot.limit=4",
                                f"eval.zeroshot.include_path={tasks}")
    result = run_cell(cfg, resolved, tmp_path / "cell")
    assert result.status == "ok", result.error
    scores = result.metrics["zeroshot"]["tasks"]
    assert scores["cloze"]["metric"] == "acc" and scores["piqa"]["metric"] == cfg.eval.zeroshot.metric["piqa"]
    assert list((tmp_path / "cell" / "lm_eval" / "cell").glob("results_*.json"))
    assert not list((tmp_path / "cell").rglob("samples_*.jsonl"))  # before: always written


def test_lambada_through_its_offline_mirror_is_scored_by_run_py(mirrors, tmp_path):
    """A task beyond the papers' (lambada_openai: a passage's last word by log-likelihood, no choices) has a
    mirror in its real schema and prompt; before, the mirrors held multiple-choice tasks alone."""
    docs = [json.loads(line) for line in (mirrors / "lambada_openai.jsonl").read_text().splitlines()]
    assert len(docs) == 6 and all(len(d["text"].split()) >= 10 and d["text"][-1].isalnum() for d in docs)
    run = run_py(["model=llama-tiny", "method=magnitude", "threads=1", "cache=false",
                  "eval.speed=null", *TINY, "eval=[ppl,zeroshot]", "eval.zeroshot.tasks=[lambada_openai]",
                  f"eval.zeroshot.include_path={mirrors}", f"hydra.run.dir={tmp_path / 'run'}"], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    score = result["metrics"]["zeroshot"]["tasks"]["lambada_openai"]
    assert score["metric"] == "acc" and 0 <= score["value"] <= 1  # lm-eval's primary metric, not perplexity
    assert result["protocol"]["fields"]["zeroshot_mirror"] is True
    assert "lambada_openai (mirror) acc" in run.stdout  # the table says whose numbers these are


def test_ppl_only_by_default(make_config):
    cfg, _ = make_config("model=llama-tiny", *TINY)
    assert cfg.eval.ppl is not None and cfg.eval.zeroshot is None


def test_tasks_whose_data_cannot_be_loaded_fail_the_cell_before_the_model_loads(mirrors, make_config, tmp_path,
                                                                                  monkeypatch):
    from bench import models

    loads = []
    real_load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    # a task dir that lacks piqa's YAML: the same failure as lm-eval's hub tasks offline, without the network
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in mirrors.iterdir():
        if not path.name.startswith("piqa"):
            (partial / path.name).write_bytes(path.read_bytes())
    cfg, resolved = make_config("model=llama-tiny", "method=magnitude", "sparsity=0.5", *TINY,
                                "eval=[ppl,zeroshot]", "eval.zeroshot.tasks=[boolq,piqa]",
                                f"eval.zeroshot.include_path={partial}")
    result = run_cell(cfg, resolved, tmp_path / "cell")
    assert result.status == "failed" and result.error.type == "ConfigError"
    assert "eval.zeroshot.tasks=['boolq', 'piqa'] cannot be loaded" in result.error.message
    assert "\n" not in result.error.message and loads == []  # before the model, so before any pruning


def test_a_preset_adds_reasoning_and_instruction_following_beside_the_seven(make_config):
    cfg, _ = make_config("model=llama-tiny", *TINY, "eval=[ppl,zeroshot_beyond]")
    assert cfg.eval.zeroshot.tasks[:7] == TASKS[:7] and {"mmlu", "gsm8k", "ifeval"} <= set(cfg.eval.zeroshot.tasks)
    assert cfg.eval.zeroshot.metric["hellaswag"] == "acc_norm"  # the papers' choices kept


def test_offline_mirrors_are_labelled_as_mirrors_in_tables_and_csv(mirrors, tmp_path):
    """Through run.py and `reports collect`: a score on a mirror never prints as the real benchmark's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    sweep = tmp_path / "sweep"
    run = run_py(["-m", "hydra/launcher=local", "cache=false", "model=llama-tiny",
                  "method=dense", *TINY, "eval=[ppl,zeroshot]", "eval.zeroshot.tasks=[boolq]",
                  "eval.zeroshot.limit=4", f"eval.zeroshot.include_path={mirrors}",
                  f"hydra.sweep.dir={sweep}"], env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    collected = subprocess.run([sys.executable, "-m", "reports", "collect", str(sweep), "--no-plots",
                                "--format", "md,csv,tex"],
                               cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert collected.returncode == 0, collected.stderr[-3000:]
    table = (sweep / "table.md").read_text()
    assert "boolq (mirror) acc" in table and "avg acc (mirror)" in table
    assert " boolq acc " not in table and " avg acc |" not in table and " avg acc drop |" not in table
    long = pd.read_csv(sweep / "table.csv")
    assert set(long.loc[long["metric"] == "acc/boolq", "label"]) == {"boolq (mirror) acc"}
    assert r"BoolQ\\(mirror)" in (sweep / "table.tex").read_text()
