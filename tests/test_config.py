"""Bad input fails at config time with one line naming the key, the value and what is allowed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bench.core.vocab import ConfigError
from tests.conftest import ROOT


@pytest.mark.parametrize("overrides, fragments", [
    (["sparsity=1.0"], ["sparsity=1.0", "allowed"]),
    (["sparsity=-0.1"], ["sparsity=-0.1", "allowed"]),
    (["method.sparsity_type=4:2"], ["method.sparsity_type='4:2'", "N < M"]),
    (["method.sparsity_type=2of4"], ["method.sparsity_type='2of4'", "allowed"]),
    (["method.sparsity_type=1:4"], ["sparsity=0.5", "sparsity=0.75"]),
    (["eval.ppl.seqlen=4096"], ["eval.ppl.seqlen=4096", "allowed: 1..512"]),
    (["data.calib.seqlen=0"], ["data.calib.seqlen=0", "allowed"]),
    (["data.calib.batch=0"], ["data.calib.batch=0", "allowed: >= 1"]),
    (["data.calib.batch=-1"], ["data.calib.batch=-1", "allowed: >= 1"]),
    (["data.calib.batch=x"], ["data.calib.batch", "'x'"]),
    (["eval.ppl.datasets=[wikitext3]"], ["eval.ppl.datasets='wikitext3'", "wikitext2, ptb, c4"]),
    (["data.calib.dataset=c5"], ["data.calib.dataset='c5'", "allowed"]),
    (["model.path=/no/such/dir"], ["model.path='/no/such/dir'", "does not exist"]),
    (["+method.blocksiz=64"], ["method.blocksiz", "blocksize, groupsize, percdamp"]),
    (["method.pruner=obs"], ["method.pruner='obs'", "sparsegpt"]),
    (["method.percdamp=abc"], ["method"]),
    (["device=tpu"], ["device='tpu'", "cpu, cuda"]),
])
def test_bad_values_name_key_value_and_allowed(overrides, fragments, make_config):
    with pytest.raises(ConfigError) as info:
        make_config("model=llama-tiny", *overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_dense_ignores_the_sweep_sparsity(make_config):
    cfg, _ = make_config("method=dense", "sparsity=0.7")
    assert cfg.sparsity == 0.0


def test_run_py_exits_with_one_line_error_and_writes_no_result(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "model=llama-tiny", "sparsity=1.5",
                           f"hydra.run.dir={tmp_path}/run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: sparsity=1.5" in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_unknown_model_lists_the_zoo(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "model=opt-1t", f"hydra.run.dir={tmp_path}/run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "model/opt-1t" in proc.stderr and "opt-125m" in proc.stderr
