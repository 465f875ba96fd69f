"""End to end on the three tiny architectures: load -> prune -> eval -> result JSON."""
from __future__ import annotations

import json

import pytest

from bench.cell import run_cell
from tests.conftest import TINY


@pytest.mark.parametrize("model", ["opt-tiny", "bloom-tiny", "llama-tiny"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_full_pipeline_writes_complete_result(model, method, make_config, tmp_path):
    cfg, resolved = make_config(f"model={model}", f"method={method}", "sparsity=0.5", *TINY)
    result = run_cell(cfg, resolved, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "ok", saved["error"]
    assert saved["config_hash"] == result["config_hash"]
    assert abs(saved["sparsity"]["measured"] - 0.5) < 0.01
    ppl = saved["metrics"]["ppl"]["pydoc"]
    assert 1 < ppl < 1e4
    assert saved["provenance"]["packages"]["torch"]
    assert saved["timings"]["prune"] > 0 and saved["peak_memory"]["rss_mb"] > 0
