"""Min-max quantization and joint sparsity + quantization in SparseGPT."""
from __future__ import annotations

import json

import pytest
import torch

from bench.cell import run_cell
from bench.core.vocab import ConfigError, SparsityPattern
from methods import quant
from methods.pruners.sparsegpt import sparsegpt
from reports.collect import collect
from tests.conftest import TINY


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
@pytest.mark.parametrize("groupsize", [None, 16])
def test_round_trip_error_is_at_most_half_a_step(bits, groupsize):
    torch.manual_seed(bits)
    W = torch.randn(8, 64) * torch.rand(8, 1) * 3
    Q = quant.quantize_rtn(W, bits, groupsize)
    for start in range(0, 64, groupsize or 64):
        part = W[:, start:start + (groupsize or 64)]
        step = (part.max(1).values.clamp(min=0) - part.min(1).values.clamp(max=0)) / (2 ** bits - 1)
        error = (Q[:, start:start + (groupsize or 64)] - part).abs().max(1).values
        assert torch.all(error <= step / 2 + 1e-6)
        for row in Q[:, start:start + (groupsize or 64)]:
            assert len(row.unique()) <= 2 ** bits


def test_zero_stays_zero_and_all_zero_rows_survive():
    W = torch.tensor([[0.0, 0.3, 0.7, 1.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.2, 0.5]])
    Q = quant.quantize_rtn(W, 2)
    assert torch.all(Q[W == 0] == 0)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    X = torch.randn(512, 64) @ torch.randn(64, 64)
    W = torch.randn(32, 64)
    H = 2 * X.T @ X / 512
    Q = sparsegpt(W, H, 0.0, SparsityPattern("unstructured"), wbits=3)
    rtn = quant.quantize_rtn(W, 3)
    assert all(len(row.unique()) <= 8 for row in Q)
    assert ((W - Q) @ X.T).pow(2).sum() < 0.8 * ((W - rtn) @ X.T).pow(2).sum()


def test_joint_sparsity_and_quantization_keeps_mask_and_grid():
    torch.manual_seed(1)
    X = torch.randn(256, 64)
    W = torch.randn(16, 64)
    Q = sparsegpt(W, 2 * X.T @ X / 256, 0.7, SparsityPattern("unstructured"), blocksize=32, wbits=4, groupsize=32)
    assert (Q == 0).float().mean() >= round(0.7 * 16 * 32) / (16 * 32)  # >= the mask (one per 32-column block)
    for row in Q:
        for start in (0, 32):
            assert len(row[start:start + 32].unique()) <= 16


@pytest.mark.parametrize("overrides", [["method.wbits=5"], ["method.wbits=16"], ["method.groupsize=64"],
                                       ["method.wbits=4", "method.groupsize=48"]])
def test_bad_quantization_configs_fail_at_config_time(overrides, make_config):
    with pytest.raises(ConfigError, match="method.(wbits|groupsize)"):
        make_config("model=llama-tiny", "method=sparsegpt", *overrides)


@pytest.mark.parametrize("model", ["opt-tiny", "bloom-tiny", "llama-tiny"])
def test_quantize_only_and_joint_runs_get_their_own_table_rows(model, make_config, tmp_path):
    for name, overrides in (("q", ["sparsity=0", "method.wbits=4"]),
                            ("l", ["method=loss_estimate", "sparsity=0.7", "method.k=2", "method.wbits=3"])):
        cfg, resolved = make_config(f"model={model}", "method=sparsegpt", *overrides, *TINY)
        run_cell(cfg, resolved, tmp_path / name)
        saved = json.loads((tmp_path / name / "result.json").read_text())
        assert saved["status"] == "ok", saved["error"]
    quantized_only = json.loads((tmp_path / "q" / "result.json").read_text())
    assert quantized_only["sparsity"]["measured"] < 0.5  # quantized, not pruned
    table = collect(tmp_path, write=False)
    labels = [row[1] for row in table.results.rows]
    display = {name: json.loads((tmp_path / name / "result.json").read_text())["cell"]["display"] for name in "ql"}
    assert {f"{display['q']} + 4-bit", f"{display['l']} + 3-bit"} <= set(labels)
    joint = json.loads((tmp_path / "l" / "result.json").read_text())
    assert joint["sparsity"]["measured"] >= 0.7 - 0.001
