"""Hardening (issue 13): bad input is a one-line error naming the key before any work; faults (kills,
SIGTERM, corrupt and foreign files, a full disk) lose no finished result; hostile files run nothing."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from bench import cache as caching
from bench import isolate, models, sweep
from bench.cell import run_cell
from bench.compose import compose
from bench.config import validate
from bench.core import engine, perplexity, records
from bench.core.vocab import ConfigError
from methods import lifecycle
from reports.collect import collect
from reports.status import render, status
from tests.conftest import ROOT, TINY, run_py

BASE = ["model=llama-tiny"]

# (overrides, the key the one-line error must name). Every row fails in validate(compose(...)), i.e.
# before any model is loaded.
BAD_INPUTS = [
    # names that become paths, and values that reach a command line
    (["model.name=a/../../outside"], "model.name"),
    (["model.name=../up"], "model.name"),
    (["model.name=-rf"], "model.name"),
    (["model.name=.hidden"], "model.name"),
    (["model.name=a..b"], "model.name"),
    (["model.name='a b'"], "model.name"),
    (["model.name=''"], "model.name"),
    (["method.name=x/y"], "method.name"),
    (["method.name=.."], "method.name"),
    (["method.name=-x"], "method.name"),
    (["model=opt-125m", "model.id='--index-url=http://evil'"], "model.id"),
    (["model=smollm2-135m", "model.id=-e"], "model.id"),
    (["model=smollm2-135m", "model.file=../../etc/passwd"], "model.file"),
    (["model=smollm2-135m", "model.file=/etc/passwd"], "model.file"),
    (["save_dir=''"], "save_dir"),
    # calibration too small for a search's fitness samples (was refused in the cell, after loading the model)
    (["method=self_pruner_ga", "data.calib.nsamples=4"], "method.fitness_nsamples"),
    # numbers: ranges and types
    (["sparsity=1.0"], "sparsity"),
    (["sparsity=-0.1"], "sparsity"),
    (["sparsity=abc"], "sparsity"),
    (["sparsity=nan"], "sparsity"),
    (["sparsity=inf"], "sparsity"),
    (["sparsity=true"], "sparsity"),
    (["sparsity=[0.5]"], "sparsity"),
    (["seed=abc"], "seed"),
    (["seed=1.5"], "seed"),
    (["seed=true"], "seed"),
    (["eval.ppl.max_windows=0"], "eval.ppl.max_windows"),
    (["eval.ppl.max_windows=-1"], "eval.ppl.max_windows"),
    (["eval.ppl.max_windows=abc"], "eval.ppl.max_windows"),
    (["eval.ppl.seqlen=0"], "eval.ppl.seqlen"),
    (["eval.ppl.seqlen=4096"], "eval.ppl.seqlen"),
    (["data.calib.seqlen=0"], "data.calib.seqlen"),
    (["data.calib.seqlen=100000"], "data.calib.seqlen"),
    (["data.calib.nsamples=0"], "data.calib.nsamples"),
    (["data.calib.nsamples=-5"], "data.calib.nsamples"),
    (["model.seqlen=0"], "model.seqlen"),
    (["model.seqlen=abc"], "model.seqlen"),
    (["model.resources.gpus=-1"], "model.resources.gpus"),
    (["model.resources.mem_gb=0"], "model.resources.mem_gb"),
    (["data.allow_fallback=maybe"], "data.allow_fallback"),
    # choices, corpora, paths
    (["eval.ppl.datasets=[wikitext3]"], "eval.ppl.datasets"),
    (["data.calib.dataset=c5"], "data.calib.dataset"),
    (["model.path=/no/such/dir"], "model.path"),
    (["model.dtype=float8"], "model.dtype"),
    (["model.source=ftp"], "model.source"),
    (["model.architecture.model_type=gpt9"], "model.architecture.model_type"),
    (["device=tpu"], "device"),
    (["logger.name=mlflow"], "logger.name"),
    (["logger.mode=sometimes"], "logger.mode"),
    (["eval=zeroshot", "eval.zeroshot.tasks=[1]"], "eval.zeroshot.tasks"),
    (["eval=zeroshot", "eval.zeroshot.metric.boolq=acc_norm"], "eval.zeroshot.metric.boolq"),
    (["eval=zeroshot", "eval.zeroshot.num_fewshot=-1"], "eval.zeroshot.num_fewshot"),
    (["eval=zeroshot", "eval.zeroshot.limit=0"], "eval.zeroshot.limit"),
    # unknown presets and keys
    (["experiment=nope"], "experiment"),
    (["method=nope"], "method"),
    (["data=nope"], "data"),
    (["protocol=nope"], "protocol"),
    (["model=opt-1t"], "model/opt-1t"),
    (["+sparsty=0.7"], "sparsty"),
    (["+foo=1"], "foo"),
    (["+method.blocksiz=64"], "method.blocksiz"),
    (["+model.sizee=1"], "model.sizee"),
    # methods: N:M and structured limits
    (["method.sparsity_type=4:2"], "method.sparsity_type"),
    (["method.sparsity_type=2of4"], "method.sparsity_type"),
    (["method.sparsity_type=0:4"], "method.sparsity_type"),
    (["method.sparsity_type=1:4"], "sparsity"),
    (["sparsity=0.7", "method.sparsity_type=2:4"], "sparsity"),
    (["method=owl_wanda", "method.sparsity_type=2:4"], "method.sparsity_type"),
    (["method=cfsp", "method.sparsity_type=2:4"], "method.sparsity_type"),
    (["method=cfsp", "method.round_to=0"], "method.round_to"),
    # before: refused inside the cell, after loading the model and its dense pass (llama-tiny's FFN is 192 wide)
    (["method=cfsp", "method.round_to=256"], "method.round_to=256 is larger than the smallest FFN width (192)"),
    (["method=cfsp", "sparsity=0.8"], "sparsity=0.8 leaves zero FFN channels in some block with method.round_to=128"),
    (["method=cfsp", "method.a=-1"], "method.a"),
    (["method=cfsp", "method.fine_score=bogus"], "method.fine_score"),
    (["method=wanda_sp", "method.selection=bogus"], "method.selection"),
    (["method=wanda", "recovery=lora"], "recovery"),
    (["method=cfsp", "method.round_to=1", "recovery=lora", "recovery.rank=0"], "recovery.rank"),
    (["method.pruner=obs"], "method.pruner"),
    (["method.allocator=foo"], "method.allocator"),
    (["method.percdamp=abc"], "method.percdamp"),
    (["method.percdamp=1.5"], "method.percdamp"),
    (["method.blocksize=0"], "method.blocksize"),
    (["method.wbits=5"], "method.wbits"),
]


@pytest.mark.parametrize("overrides, key", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_key(overrides, key, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded while validating")

    monkeypatch.setattr(models, "load", no_loading)
    base = [] if overrides[0].startswith("model=") else BASE
    with pytest.raises(ConfigError) as info:
        validate(compose([*base, *overrides]))
    message = str(info.value)
    assert "\n" not in message and key in message, message


# Values only code or a YAML file can hold (the override grammar has no control characters).
@pytest.mark.parametrize("key, value", [
    ("model.name", "a\nb"), ("model.name", "tab\there"), ("method.name", "x\x00y"), ("save_dir", "/tmp/a\nb"),
    ("model.name", "a\\b"),
])
def test_control_characters_and_backslashes_in_names_are_refused(key, value):
    cfg = compose(BASE)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        validate(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("launcher, key, value", [
    ("slurm", "partition", "gpu\n#!/bin/sh\ntouch /tmp/pwned"),
    ("slurm", "account", "lab\rx"),
    ("slurm", "qos", "normal\x1b[2J"),
    ("slurm", "constraint", "a100\nrm -rf ~"),
    ("slurm", "setup", ["module load cuda", "echo ok\ntouch /tmp/pwned"]),
    ("slurm", "additional_parameters", {"mail-type": "END\n#SBATCH --uid=0"}),
    ("local", "name", "cell\nx"),
])
def test_launcher_values_with_control_characters_are_refused_before_submitting(launcher, key, value, monkeypatch):
    monkeypatch.setattr(sweep.shutil, "which", lambda name: f"/usr/bin/{name}")  # as on a login node
    cfg = compose([f"hydra/launcher={launcher}", *BASE], with_hydra=True)
    with open_dict(cfg.hydra.launcher):
        cfg.hydra.launcher[key] = value
    with pytest.raises(ConfigError, match=rf"hydra\.launcher\.{key}") as info:
        sweep._check_launcher(cfg)
    assert "\n" not in str(info.value) and "control character" in str(info.value)


def _start_sweep(*args: str) -> subprocess.Popen:
    """`run.py -m` in an interpreter of its own, which a test signals."""
    return subprocess.Popen([sys.executable, "run.py", "-m", "cache=false", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_run_py_answers_bad_input_with_one_line_and_no_traceback(tmp_path):
    cases = {
        "experiment=nope": "experiment/nope",
        "+sparsty=0.7": "sparsty is not a known key",
        "sparsity=abc": "sparsity='abc' is not valid",
        "model.name=a/../../outside": "model.name='a/../../outside' is not a valid name",
    }
    procs = {bad: run_py(["cache=false", *BASE, bad, f"hydra.run.dir={tmp_path}/{i}"], timeout=300)
             for i, bad in enumerate(cases)}
    swept = run_py(["-m", "cache=false", *BASE, "method=magnitude", "model.name=ok,a/../x",
                    f"hydra.sweep.dir={tmp_path}/s"], timeout=300)
    for bad, proc in [*procs.items(), ("sweep", swept)]:
        err = proc.stderr
        assert proc.returncode != 0 and "Traceback" not in err, (bad, err)
        assert cases.get(bad, "sweep not started: cell [") in err, (bad, err)
    assert not list(tmp_path.rglob(records.RESULT_FILE))
    assert not (ROOT.parent / "outside").exists()


# --- save_dir: nothing the harness did not create is ever deleted ------------------------------------

def _tiny(make_config, *extra):
    return make_config(*BASE, "method=magnitude", *TINY, *extra)


def test_save_dir_on_a_folder_with_a_users_file_leaves_it_intact(make_config, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    partial = tmp_path / "mine.partial"  # what the old code also removed
    partial.mkdir()
    (partial / "notes.txt").write_text("keep")
    cfg, resolved = _tiny(make_config, f"save_dir={target}")
    result = run_cell(cfg, resolved, tmp_path / "out")
    assert result.status == "failed" and result.error.type == "ConfigError"
    assert "save_dir=" in result.error.message and "not a prunebench checkpoint" in result.error.message
    assert "load" not in result.timings  # refused before any work
    assert (target / "thesis.tex").read_text() == "years of work" and (partial / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "mine.partial", "out"]


def test_save_dir_writes_a_marked_checkpoint_replaces_only_its_own_and_resaves_on_rerun(make_config, tmp_path):
    target = tmp_path / "ckpt"
    cfg, resolved = _tiny(make_config, f"save_dir={target}")
    first = run_cell(cfg, resolved, tmp_path / "a")
    assert first.ok and first.saved_to == str(target) and (target / models.MARKER).is_file()
    (target / "config.json").write_text("{}")  # ours: may be replaced
    again = run_cell(cfg, resolved, tmp_path / "b")  # the same cell asking to save again: runs and saves
    assert again.ok and "load" in again.timings  # ran again rather than reporting the first result
    assert again.path == str(tmp_path / "b" / "result.json")
    assert json.loads((target / "config.json").read_text()).get("model_type") == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "ckpt"]  # no staging dirs left behind


def test_in_a_sweep_every_cell_saves_to_its_own_subfolder(make_config, tmp_path):
    root = tmp_path / "saved"
    for sparsity, name in ((0.5, "0_llama-tiny_magnitude_0.5"), (0.6, "1_llama-tiny_magnitude_0.6")):
        cfg, resolved = _tiny(make_config, f"sparsity={sparsity}", f"save_dir={root}")
        assert run_cell(cfg, resolved, tmp_path / "sweep" / name, sweep_dir=tmp_path / "sweep").ok
    assert sorted(p.name for p in root.iterdir()) == ["0_llama-tiny_magnitude_0.5", "1_llama-tiny_magnitude_0.6"]
    assert all((p / models.MARKER).is_file() for p in root.iterdir())


# --- result files: corrupt, foreign, truncated; no path overwrites an ok result ----------------------

def _ok_result(directory: Path, config_hash: str = "h-ok") -> str:
    records.write_result(directory, records.Result("ok", config_hash, records.CellKey("m", "magnitude", 0.5),
                                                   metrics={"ppl": {"pydoc": 12.5}}))
    return _sha(directory / records.RESULT_FILE)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


FOREIGN = {
    "list": "[]",
    "truncated": '{"schema": 2, "status": "ok", "config_hash": "x", "cell": {"model": "m"',
    "no_metrics": json.dumps({"schema": 2, "status": "ok", "config_hash": "x", "cell": {"model": "m", "method": "x",
                                                                                          "sparsity": 0.5}}),
    "nan": '{"schema": 2, "status": "ok", "config_hash": "x", "cell": {"model": "m", "method": "x", "sparsity": 0.5},'
           ' "metrics": {"ppl": {"pydoc": NaN}}}',
    "metric_not_object": json.dumps({"schema": 2, "status": "ok", "config_hash": "x", "metrics": {"ppl": 5},
                                     "cell": {"model": "m", "method": "x", "sparsity": 0.5}}),
    "binary": "\udcff\x00garbage",
    "deep": "[" * 100000,
}


def _write_foreign(root: Path) -> dict[str, str]:
    for name, text in FOREIGN.items():
        (root / name).mkdir(parents=True)
        (root / name / records.RESULT_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    return {name: _sha(root / name / records.RESULT_FILE) for name in FOREIGN}


def test_foreign_truncated_and_non_strict_results_are_reported_corrupt_and_left_alone(tmp_path):
    good = _ok_result(tmp_path / "good")
    before = _write_foreign(tmp_path)
    records.write_json_atomic(tmp_path / records.CELLS_FILE, {"cells": [{"overrides": ["x"], "config_hash": "h-ok"}]})
    found = records.read_results(tmp_path)
    assert [r.config_hash for r in found.records] == ["h-ok"]
    assert sorted(Path(path).parent.name for path, _ in found.corrupt) == sorted(FOREIGN)
    rows, corrupt = status(tmp_path)
    assert [row.state for row in rows] == ["done"] and len(corrupt) == len(FOREIGN)
    assert render(rows, corrupt).count("left alone") == len(FOREIGN)
    report = collect(tmp_path, write=False)
    assert sum("not a result, left alone" in note for note in report.results.footnotes) == len(FOREIGN)
    assert _sha(tmp_path / "good" / records.RESULT_FILE) == good
    assert {name: _sha(tmp_path / name / records.RESULT_FILE) for name in FOREIGN} == before


def test_a_truncated_cells_json_is_reported_not_a_traceback(tmp_path):
    _ok_result(tmp_path / "good")
    (tmp_path / records.CELLS_FILE).write_text('{"cells": [{"overrides": ["sparsity=0.5"], "config_ha')
    rows, corrupt = status(tmp_path)
    assert rows == [] and corrupt[0][0].endswith(records.CELLS_FILE) and "JSONDecodeError" in corrupt[0][1]
    out = subprocess.run([sys.executable, "-m", "reports", "status", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "cells.json" in out.stdout


def _crash(out_dir: Path) -> None:
    raise RuntimeError("the cell process crashed before returning")  # the child dies without a result


def test_marking_a_dead_cell_never_overwrites_an_ok_result(tmp_path):
    good = _ok_result(tmp_path)
    result = isolate.run_isolated(tmp_path, _crash, tmp_path)
    assert result.ok and _sha(tmp_path / records.RESULT_FILE) == good


def test_a_cell_never_overwrites_an_ok_or_unreadable_result_in_its_dir(make_config, tmp_path):
    """Another sweep's ok result, or a file that is not a result, in the dir this cell was given: the cell
    writes beside it; only +rerun=all of the very same cell replaces its own ok result."""
    out = tmp_path / "0_llama-tiny_magnitude_0.5"
    other = _ok_result(out, "another-sweeps-cell")
    (tmp_path / "0_llama-tiny_magnitude_0.5.1").mkdir()
    (tmp_path / "0_llama-tiny_magnitude_0.5.1" / records.RESULT_FILE).write_text("[]")
    cfg, resolved = _tiny(make_config)
    result = run_cell(cfg, resolved, out, sweep_dir=tmp_path)
    assert result.ok
    assert _sha(out / records.RESULT_FILE) == other
    assert (tmp_path / "0_llama-tiny_magnitude_0.5.1" / records.RESULT_FILE).read_text() == "[]"
    mine = tmp_path / "0_llama-tiny_magnitude_0.5.2" / records.RESULT_FILE
    assert records.read_result(mine).config_hash == result.config_hash
    forced = run_cell(cfg, resolved, mine.parent, sweep_dir=tmp_path, rerun="all")
    assert forced.ok and records.read_result(mine).process["started"] == forced.process["started"]
    assert _sha(out / records.RESULT_FILE) == other


def test_results_are_strict_json_and_a_non_finite_metric_fails_the_cell(make_config, tmp_path, monkeypatch):
    records.write_result(tmp_path / "w", records.Result("failed", "h", records.CellKey("m", "x", 0.5),
                                                        sparsity={"measured": float("nan"), "x": [float("inf")]}))
    payload = json.loads((tmp_path / "w" / records.RESULT_FILE).read_text(), parse_constant=pytest.fail)
    assert payload["sparsity"] == {"measured": None, "x": [None]}

    monkeypatch.setattr(perplexity, "perplexity", lambda *args, **kwargs: float("nan"))
    cfg, resolved = _tiny(make_config)
    result = run_cell(cfg, resolved, tmp_path / "c")
    assert result.status == "failed" and result.error.type == "FloatingPointError"
    assert "metrics.ppl.pydoc is nan" in result.error.message
    json.loads((tmp_path / "c" / records.RESULT_FILE).read_text(), parse_constant=pytest.fail)


@pytest.mark.parametrize("when", ["after loading", "after pruning"])
def test_nan_weights_fail_the_cell_with_the_reason(when, make_config, tmp_path, monkeypatch):
    def poison(model):
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")

    load, prune = models.load, lifecycle.prune

    def poisoned_load(cfg):
        model, tokenizer = load(cfg)
        poison(model)
        return model, tokenizer

    def poisoned_prune(model, *args, **kwargs):
        report = prune(model, *args, **kwargs)
        poison(model)
        return report

    if when == "after loading":
        monkeypatch.setattr(models, "load", poisoned_load)
    else:
        monkeypatch.setattr(lifecycle, "prune", poisoned_prune)
    cfg, resolved = _tiny(make_config)
    result = run_cell(cfg, resolved, tmp_path)
    assert result.status == "failed" and result.error.type == "FloatingPointError"
    assert when in result.error.message and "model.layers.1.mlp.down_proj.weight" in result.error.message
    assert ("calib_data" in result.timings) == (when == "after pruning") and not result.sparsity


def test_the_finite_check_of_the_weights_holds_a_chunk_not_a_copy_of_the_largest_tensor():
    """torch.isfinite of a whole tensor holds its abs() and two masks: a Gemma-3-270M cell (a 0.63 GiB
    embedding) peaked 1.3 GiB over its plan, after loading and after pruning. A NaN in the last chunk is
    still found."""
    script = textwrap.dedent("""
        import resource, sys, torch
        from torch import nn
        from bench import source
        model = nn.Embedding(65536, 1024)  # 256 MiB
        with torch.no_grad():
            model.weight[-1, -1] = float("nan")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            source._check_finite(model, "after loading")
        except FloatingPointError as exc:
            print(exc)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    message, grown = run.stdout.strip().splitlines()
    assert message == "1 tensors hold NaN or inf after loading: weight"
    assert int(grown) < 2**28 / 4, f"the check grew the peak by {int(grown) / 2**20:.0f} MiB on a 256 MiB tensor"


def test_model_seqlen_beyond_the_checkpoint_positions_fails_right_after_loading(make_config, tmp_path):
    cfg, resolved = _tiny(make_config, "model.seqlen=1024")  # llama-tiny has 512 positions
    result = run_cell(cfg, resolved, tmp_path)
    assert result.status == "failed" and result.error.type == "ConfigError"
    assert result.error.message.startswith("model.seqlen=1024 is out of range; allowed: 1..512")
    assert "load" in result.timings and "calib_data" not in result.timings


def test_structured_rounding_far_from_the_target_is_a_warning_in_the_result(make_config, tmp_path):
    cfg, resolved = make_config(*BASE, "method=cfsp", "sparsity=0.2", *TINY)  # round_to=128 on a 192-wide FFN
    result = run_cell(cfg, resolved, tmp_path)
    assert result.ok and abs(result.sparsity["measured"] - 1 / 3) < 1e-6
    assert any("removed 33.3% of FFN channels for a target of 20.0%" in w for w in result.warnings)
    exact, exact_resolved = make_config(*BASE, "method=cfsp", "sparsity=0.2", "method.round_to=1", *TINY)
    assert not [w for w in run_cell(exact, exact_resolved, tmp_path / "exact").warnings if "structured" in w]


# --- the cross-cell cache: files, not programs ---------------------------------------------------

class _Trap:
    """Unpickling this creates a file: what a tampered cache entry did under torch.load(weights_only=False)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_tampered_cache_entry_runs_nothing_and_is_recomputed(tmp_path):
    disk = caching.DiskCache(tmp_path / "cache")
    key, code = ["some", "key"], caching.STAGE_MODULES["tokens"]
    digest = caching._digest([key, caching.code_fingerprint(code)])
    entry = tmp_path / "cache" / "tokens" / f"{digest}{caching.SUFFIX}"
    entry.parent.mkdir(parents=True)
    trap = tmp_path / "pwned"
    for path in (entry, entry.with_suffix(".pt")):  # where the entry is, and where the old cache kept it
        path.write_bytes(pickle.dumps(_Trap(str(trap))))
    value = disk.get_or_compute("tokens", key, code, lambda: torch.arange(5))
    assert torch.equal(value, torch.arange(5)) and not trap.exists()
    assert disk.misses == ["tokens"] and disk.hits == []
    assert torch.equal(disk.get_or_compute("tokens", key, code, pytest.fail), torch.arange(5))  # rewritten, valid
    other = caching._digest([["other"], caching.code_fingerprint(code)])
    (entry.parent / f"{other}{caching.SUFFIX}").write_bytes(entry.read_bytes())  # a valid entry of another key
    assert caching.DiskCache(tmp_path / "cache").get_or_compute("tokens", ["other"], code, lambda: 7) == 7


def test_cached_values_round_trip_exactly(make_config, tmp_path):
    cfg, _ = _tiny(make_config)
    model, _ = models.load(cfg.model)
    hidden, kwargs = engine.capture_inputs(model, torch.randint(0, 256, (2, 16)), "cpu")
    states = [{"q": np.array([0.5, 1.5]), "k": np.float64(2.0)}, {3: 0.25, "n": [1, 2], "t": (None, True)},
              {"inf": float("inf")}]
    disk = caching.DiskCache(tmp_path)
    for kind, value in (("block0", (hidden, kwargs)), ("dense_state", states), ("dense_ppl", 12.25)):
        disk.get_or_compute(kind, [kind], (), lambda: value)
        back = caching.DiskCache(tmp_path).get_or_compute(kind, [kind], (), pytest.fail)
        assert _same(back, value), kind


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b) or (isinstance(a, float) and float(a) == float(b))


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(make_config, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(caching, "save_file", full_disk)
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    cfg, resolved = _tiny(make_config)
    result = run_cell(cfg, resolved, tmp_path / "out", cache=True)
    assert result.ok and result.metrics["ppl"]
    assert any(w.startswith("cache: tokens not stored (ENOSPC") for w in result.warnings)
    # the resume state goes through the same writer: it costs resumability, never the cell
    assert any(w.startswith("resume state not saved") for w in result.warnings)
    assert not list((tmp_path / "cache").rglob(f"*{caching.SUFFIX}"))


def test_a_real_full_disk_keeps_every_finished_result(make_config, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        good = _ok_result(disk / "sweep" / "0_done")
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk
        try:
            while True:
                os.write(filler, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(filler)
        cfg, resolved = _tiny(make_config)
        os.environ["PRUNEBENCH_CACHE"] = str(disk / "cache")
        try:
            result = isolate.run_isolated(disk / "sweep" / "1_new", run_cell, cfg, resolved, disk / "sweep" / "1_new",
                                        disk / "sweep", "failed", True)
        finally:
            del os.environ["PRUNEBENCH_CACHE"]
        assert not result.ok  # nowhere to write its result
        assert _sha(disk / "sweep" / "0_done" / records.RESULT_FILE) == good
        assert [r.config_hash for r in records.read_results(disk / "sweep").records] == ["h-ok"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- sweeps: one at a time per dir, manifests merged, SIGTERM and kills lose nothing ---------------

def test_a_second_sweep_into_a_locked_dir_is_refused_and_manifests_merge(tmp_path):
    held = sweep.lock_sweep_dir(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another sweep \(pid {os.getpid()}\)"):
            sweep.lock_sweep_dir(tmp_path)
    finally:
        os.close(held)
    os.close(sweep.lock_sweep_dir(tmp_path))  # released: free again
    first = [{"overrides": ["sparsity=0.5"], "config_hash": "a"}, {"overrides": ["sparsity=0.6"], "config_hash": "b"}]
    sweep.merge_manifest(tmp_path, first)
    sweep.merge_manifest(tmp_path, [{"overrides": ["method=wanda"], "config_hash": "c"}, first[1]])
    assert [c["config_hash"] for c in records.read_manifest(tmp_path)] == ["c", "b", "a"]
    (tmp_path / records.CELLS_FILE).write_text('{"cells": [')
    sweep.merge_manifest(tmp_path, first)
    assert (tmp_path / f"{records.CELLS_FILE}.corrupt").read_text() == '{"cells": ['
    assert [c["config_hash"] for c in records.read_manifest(tmp_path)] == ["a", "b"]


SLOW_CELL = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bench import isolate
    from bench.core import records

    def cell(out_dir):
        import os
        records.write_result(out_dir, records.Result("running", "h", records.CellKey("m", "x", 0.5),
                                                     process={"pid": os.getpid()}))
        time.sleep(600)

    isolate.run_isolated(Path(sys.argv[1]), cell, Path(sys.argv[1]))
""")


def _child_pid(out_dir: Path) -> int:
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            return records.read_result(out_dir / records.RESULT_FILE).process["pid"]
        except (records.CorruptResult, KeyError):
            time.sleep(0.2)
    raise AssertionError("the cell never started")


def _gone(pid: int, within: float = 30) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signalled_sweep_process_leaves_no_cell_running(sig, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CELL, str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    child = _child_pid(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert _gone(child), "the cell process outlived its sweep"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "Traceback" not in err
        result = records.read_result(tmp_path / records.RESULT_FILE)
        assert result.status == "interrupted" and "received SIGTERM" in result.error.message


def test_sigterm_mid_sweep_then_resume_completes_and_keeps_finished_results(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [*BASE, "method=magnitude", "sparsity=0.3,0.5,0.7", *TINY, f"hydra.sweep.dir={sweep_dir}"]
    proc = _start_sweep(*command)
    deadline = time.time() + 400
    while time.time() < deadline and not any(r.ok for r in records.read_results(sweep_dir).records):
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    found = records.read_results(sweep_dir)
    finished = {r.path: _sha(Path(r.path)) for r in found.records if r.ok}
    assert finished and not found.corrupt
    for r in found.records:
        assert r.ok or r.status == "interrupted" or _gone(r.process.get("pid", 0), 1)
    resumed = _start_sweep(*command)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert {path: _sha(Path(path)) for path in finished} == finished
    rows, corrupt = status(sweep_dir)
    assert [row.state for row in rows] == ["done"] * 3 and not corrupt
    report = collect(sweep_dir, write=False)
    assert sorted(r.cell.sparsity for r in report.records) == [0.3, 0.5, 0.7] and all(r.ok for r in report.records)
