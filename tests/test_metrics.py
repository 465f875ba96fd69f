"""The metric registry end to end: a tiny zero-shot sweep with a dense cell through run.py, then
`python -m reports collect`. Every registered metric has a producer on real records, and `acc_avg_drop`
is computed against the dense cell in the table, the long CSV and a target's verdict."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from bench.config import EvalConfig
from bench.core import records
from bench.core.metrics import METRICS
from tests.conftest import FAST_SPEED, ROOT, TINY, built_once, load_script, run_py

TARGET = ("+targets=[{model: llama-tiny, method: magnitude, sparsity: 0.4, metric: acc_avg_drop, reported: 1.0, "
          "tolerance: 100, unit: absolute, source: test}]")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return built_once(tmp_path_factory, "metrics", _sweep) / "sweep"


def _sweep(root):
    """dense, an unstructured and a structured pruner (whose cell measures the speed-ups), with zero-shot."""
    mirrors = load_script("zeroshot_mirrors").write_mirrors(root / "mirrors", n=6)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(root / "hf_datasets")}
    run = run_py(["-m", "hydra/launcher=local", "cache=false", "model=llama-tiny",
                  "method=dense,magnitude,wanda_sp", "sparsity=0.4", *TINY, *FAST_SPEED, "eval=[ppl,zeroshot]",
                  "eval.zeroshot.tasks=[boolq,piqa]", "eval.zeroshot.limit=4",
                  f"eval.zeroshot.include_path={mirrors}", TARGET, f"hydra.sweep.dir={root / 'sweep'}"], env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    collected = subprocess.run([sys.executable, "-m", "reports", "collect", str(root / "sweep"), "--no-plots"],
                               cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert collected.returncode == 0, collected.stderr[-3000:]


def test_every_metric_names_the_evaluation_that_writes_it():
    sections = {f.name for f in dataclasses.fields(EvalConfig)}
    assert all(entry.evaluated_by in sections for entry in METRICS.values())


def test_every_registered_metric_has_a_producer(sweep):
    found = records.read_results(sweep).records
    assert len(found) == 3 and all(r.ok for r in found), [r.error for r in found]
    long = pd.read_csv(sweep / "table.csv")
    for entry in METRICS.values():
        if entry.against is not None:  # computed from a record and its baseline: both must be produced
            assert entry.against in METRICS and METRICS[entry.against].against is None
            assert (long["metric"].str.partition("/")[0] == entry.name).any(), entry.name
        else:  # read from a key the pipeline writes
            assert any(entry.read(r.metrics, arg) is not None for r in found for arg in entry.args(r.metrics)), \
                entry.name


def test_acc_avg_drop_is_judged_against_the_dense_cell(sweep):
    by_method = {r.cell.method: r for r in records.read_results(sweep).records}
    assert by_method["dense"].cell.baseline and not by_method["magnitude"].cell.baseline
    expected = by_method["dense"].value("acc_avg") - by_method["magnitude"].value("acc_avg")
    long = pd.read_csv(sweep / "table.csv")
    drop = long[(long["metric"] == "acc_avg_drop") & (long["method"] == "magnitude")]["value"]
    assert list(drop) == [expected]
    table = (sweep / "table.md").read_text()
    header = [head.strip("| ") for head in next(line for line in table.splitlines()
                                                if line.startswith("| model |")).split(" | ")]
    assert "40% avg acc drop (mirror)" in header  # the sweep scores offline mirrors
    verdicts = [line for line in table.splitlines() if "| acc_avg_drop |" in line]
    assert len(verdicts) == 1 and f"| {expected:.2f} |" in verdicts[0] and "| within tolerance |" in verdicts[0]
    assert json.loads((sweep / records.CELLS_FILE).read_text())["cells"]  # collected from a real sweep dir
