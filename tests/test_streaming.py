"""Streaming big models: blocks loaded from safetensors shards when the engine reaches them give exactly
the in-memory result (weights and perplexity), while only one block is ever materialised."""
from __future__ import annotations

import errno

import pytest
import torch
import transformers

from bench import cache as caching
from bench import data, models, progress, streaming, tokenization
from bench.core import perplexity
from methods import catalog, lifecycle
from tests.conftest import TINY


def test_streamed_pruning_matches_in_memory_pruning(make_config, tmp_path, monkeypatch):
    cfg, _ = make_config("model=llama-tiny", "method=sparsegpt", "sparsity=0.5", *TINY)
    model, tokenizer = models.load(cfg.model)
    model.save_pretrained(tmp_path / "dense", max_shard_size="100KB")  # several shards, blocks split across
    assert len(list((tmp_path / "dense").glob("*.safetensors"))) > 2
    ids = tokenization.tokenize(tokenizer, data.load_corpus("pydoc", "validation", None, "calib").text)
    samples = tokenization.calibration_samples(ids, 4, 64, seed=0)
    windows = tokenization.eval_windows(tokenization.tokenize(tokenizer, data.load_corpus("pydoc", "test", None, "eval").text),
                                64, 4, "pydoc")

    lifecycle.prune(model, catalog.build(cfg.method), samples, 0.5, "cpu")
    expected_ppl = perplexity.perplexity(model, windows, "cpu")

    loaded = []
    original_load = streaming.BlockStream.load

    def spy(self, index, block):
        loaded.append(sum(not p.is_meta for b in self.arch.blocks(self.model) for p in b.parameters()))
        original_load(self, index, block)

    monkeypatch.setattr(streaming.BlockStream, "load", spy)
    stream, _ = streaming.prune_streamed(tmp_path / "dense", tmp_path / "pruned", catalog.build(cfg.method),
                                      samples, 0.5)
    assert loaded == [0, 0]  # no other block is in memory when a block is loaded
    assert abs(stream.sparsity - 0.5) < 0.01

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert streaming.streamed_perplexity(tmp_path / "pruned", windows) == expected_ppl


def _saved_tiny(make_config, directory):
    cfg, _ = make_config("model=llama-tiny", *TINY)
    model, tokenizer = models.load(cfg.model)
    model.save_pretrained(directory, max_shard_size="100KB")
    tokenizer.save_pretrained(directory)
    return directory


def test_a_streamed_cell_equals_the_in_memory_cell(make_config, tmp_path):
    from bench.cell import run_cell

    dense = _saved_tiny(make_config, tmp_path / "dense")
    common = ("model=llama-tiny", f"model.path={dense}", "method=sparsegpt", "sparsity=0.5", "cache=false", *TINY)
    cfg, resolved = make_config(*common, "model.stream=false")
    in_memory = run_cell(cfg, resolved, tmp_path / "mem", rerun="all")
    cfg, resolved = make_config(*common, "model.stream=true", f"save_dir={tmp_path / 'pruned'}")
    streamed = run_cell(cfg, resolved, tmp_path / "stream", rerun="all")
    assert in_memory.status == streamed.status == "ok", (in_memory.error, streamed.error)
    assert any(w.startswith("streamed from") for w in streamed.warnings)
    assert not any(w.startswith("streamed from") for w in in_memory.warnings)
    assert streamed.sparsity["measured"] == pytest.approx(in_memory.sparsity["measured"], abs=1e-12)
    assert streamed.metrics["ppl"]["pydoc"] == pytest.approx(in_memory.metrics["ppl"]["pydoc"], rel=1e-6)
    assert (tmp_path / "pruned" / streaming.INDEX_FILE).exists()


def test_a_streamed_cell_records_the_corpus_it_fell_back_from_like_the_in_memory_cell(make_config, tmp_path):
    from bench.cell import run_cell

    dense = _saved_tiny(make_config, tmp_path / "dense")
    common = (*TINY, "model=llama-tiny", f"model.path={dense}", "method=magnitude", "sparsity=0.5", "cache=false",
              f"data.dir={tmp_path / 'no-corpora'}", "eval.ppl.datasets=[pydoc,ptb]")
    (tmp_path / "no-corpora").mkdir()  # a data dir without PTB: a dir that does not exist is refused
    fields = {}
    for stream in ("false", "true"):
        cfg, resolved = make_config(*common, f"model.stream={stream}", f"save_dir={tmp_path / stream}")
        result = run_cell(cfg, resolved, tmp_path / f"cell-{stream}", rerun="all")
        assert result.status == "ok", result.error
        fields[stream] = result.protocol["fields"]
    assert fields["true"]["eval_datasets"] == fields["false"]["eval_datasets"] == ["pydoc", "ptb(pydoc fallback)"]


def test_a_streamed_cell_keeps_the_caches_warnings(make_config, tmp_path, monkeypatch):
    from bench.cell import run_cell

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    dense = _saved_tiny(make_config, tmp_path / "dense")
    monkeypatch.setattr(caching, "save_file", full_disk)
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    cfg, resolved = make_config(*TINY, "model=llama-tiny", f"model.path={dense}", "model.stream=true",
                                "method=magnitude", "sparsity=0.5", f"save_dir={tmp_path / 'pruned'}")
    result = run_cell(cfg, resolved, tmp_path / "cell", cache=True)
    assert result.ok, result.error
    assert any(w.startswith("cache: tokens not stored (ENOSPC") for w in result.warnings), result.warnings


def test_stream_auto_streams_a_checkpoint_over_the_host_memory_budget(make_config, tmp_path):
    from bench.cell import run_cell

    dense = _saved_tiny(make_config, tmp_path / "dense")
    cfg, resolved = make_config("model=llama-tiny", f"model.path={dense}", "model.host_memory_gb=0.0001",
                                "method=magnitude", "sparsity=0.5", f"save_dir={tmp_path / 'out'}", *TINY)
    assert streaming.should_stream(cfg.model)
    result = run_cell(cfg, resolved, tmp_path / "cell", rerun="all")
    assert result.status == "ok", result.error
    assert any(w.startswith("streamed from") for w in result.warnings)
    cfg, _ = make_config("model=llama-tiny", f"model.path={dense}", *TINY)  # default budget: half the RAM
    assert not streaming.should_stream(cfg.model)


def test_a_streamed_cell_goes_through_the_same_stages_as_the_in_memory_cell(make_config, tmp_path, monkeypatch):
    """One recipe: progress.json and the timings name the same stages, streamed or not (the streamed cell
    once never entered "prune", so a watcher saw its blocks under calib_data), but "save": a streamed cell
    writes its checkpoint while it prunes."""
    from bench.cell import run_cell

    dense = _saved_tiny(make_config, tmp_path / "dense")
    stages, write = [], progress.write_json_atomic
    monkeypatch.setattr(progress, "write_json_atomic", lambda path, payload: (stages.append(payload["stages"][-1]),
                                                                              write(path, payload)))
    seen = {}
    for stream in ("false", "true"):
        stages.clear()
        cfg, resolved = make_config(*TINY, "model=llama-tiny", f"model.path={dense}", f"model.stream={stream}",
                                    "method=wanda", "sparsity=0.5", "cache=false", f"save_dir={tmp_path / stream}")
        result = run_cell(cfg, resolved, tmp_path / f"cell-{stream}", rerun="all")
        assert result.ok, result.error
        seen[stream] = [s for s in dict.fromkeys(stages) if s != "save"], [s for s in result.timings if s != "save"]
    assert seen["true"] == seen["false"]
    assert seen["true"][0] == ["start", "load", "calib_data", "prune", "eval_ppl_pydoc"]


def test_stream_auto_refuses_what_a_streamed_cell_cannot_do_before_any_work(make_config, tmp_path):
    from bench.cell import run_cell

    dense = _saved_tiny(make_config, tmp_path / "dense")
    cfg, resolved = make_config(*TINY, "model=llama-tiny", f"model.path={dense}", "model.host_memory_gb=0.0001",
                                "method=magnitude", "sparsity=0.5", f"save_dir={tmp_path / 'out'}",
                                "eval=[ppl,zeroshot]", "eval.zeroshot.tasks=[piqa]")
    result = run_cell(cfg, resolved, tmp_path / "cell")
    assert result.status == "failed" and result.error.type == "ConfigError"
    assert result.error.message.startswith("model.stream=auto chose streaming (the checkpoint exceeds "
                                           "model.host_memory_gb), which cannot run recovery or eval.zeroshot")
    assert "load" not in result.timings and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["method=self_pruner"], r"^model.stream=true cannot run method=self_pruner: its search prunes copies"),
    (["method=wanda_sp", "sparsity=0.2"], r"^model.stream=true cannot run method=wanda_sp: it changes FFN shapes"),
    (["method=wanda", "save_dir=null"], r"^model.stream=true needs save_dir"),
    (["method=wanda", "model.stream=maybe"], r"^model.stream='maybe' is not valid; allowed: auto, True, False$"),
    (["method=wanda", "eval.ppl.layerwise=sometimes"], r"^eval.ppl.layerwise='sometimes' is not valid"),
])
def test_what_cannot_stream_is_refused_naming_the_key(overrides, message, make_config, tmp_path):
    from bench.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_config("model=llama-tiny", f"model.path={tmp_path}", "model.stream=true", f"save_dir={tmp_path}/o",
                    *TINY, *overrides)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_stream_auto_budgets_half_the_jobs_cgroup_limit_not_the_nodes_ram(tmp_path, monkeypatch, version):
    """A Slurm job with --mem=8G on a 1 TB node is killed at 8 GiB: its budget is 4 GiB, not 512 GiB. The limit
    may sit on an ancestor of the process's cgroup (the job's, above the step's)."""
    root = tmp_path / "cgroup"
    job = (root / "memory" if version == "v1" else root) / "slurm" / "job_7"
    (job / "step_0").mkdir(parents=True)
    limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
    (job / limit_file).write_text(f"{8 * 2**30}\n")
    (job / "step_0" / limit_file).write_text("9223372036854771712\n" if version == "v1" else "max\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/slurm/job_7/step_0\n1:cpu:/\n" if version == "v1" else "0::/slurm/job_7/step_0\n")
    monkeypatch.setattr(streaming, "CGROUP_ROOT", root)
    monkeypatch.setattr(streaming, "PROC_CGROUP", proc)
    monkeypatch.delenv("SLURM_MEM_PER_NODE", raising=False)
    assert streaming.host_memory_budget(None) == 4 * 2**30
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "2048")  # Slurm's own word, when no cgroup enforces it
    assert streaming.host_memory_budget(None) == 2**30
    assert streaming.host_memory_budget(0.5) == 2**29  # model.host_memory_gb wins


def _memory_cgroups_writable() -> bool:
    import os
    from pathlib import Path

    root = Path("/sys/fs/cgroup/memory") if Path("/sys/fs/cgroup/memory").is_dir() else Path("/sys/fs/cgroup")
    return os.geteuid() == 0 and os.access(root, os.W_OK) and ((root / "memory.limit_in_bytes").exists()
                                                               or (root / "cgroup.controllers").exists())


@pytest.mark.skipif(not _memory_cgroups_writable(), reason="needs root and a writable memory cgroup")
def test_plan_check_capped_runs_a_streamed_cell_inside_a_cgroup_limit_to_the_in_memory_perplexity(tmp_path):
    """scripts/plan_check.py capped, the benchmark of a checkpoint bigger than the job's memory, on a tiny
    checkpoint: the streamed cell runs in its own memory cgroup and ends with the in-memory cell's ppl."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from streaming_bench import write_synthetic
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    write_synthetic(tmp_path / "ckpt", layers=2, hidden=64, ffn=128, heads=4, kv_heads=4)
    done = subprocess.run([sys.executable, "scripts/plan_check.py", "capped", str(tmp_path / "ckpt"), "--limit-gb",
                           "2", "--windows", "2", "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "cgroup memory limit 2.00 GiB" in done.stdout and "same perplexity (6 decimals): yes" in done.stdout
    peak = float(done.stdout.split("streamed, under the limit: peak RSS ")[1].split()[0])
    assert 0 < peak <= 2
