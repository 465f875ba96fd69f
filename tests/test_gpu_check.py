"""scripts/gpu_check.py's CPU half, so the script a GPU node runs has not rotted by the time one is there."""
from __future__ import annotations

import math

import torch

from tests.conftest import load_script


def test_the_cpu_half_prints_its_table_and_skips_every_gpu_cell(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU half, on any host
    gpu_check = load_script("gpu_check")
    table, rows = [], gpu_check.rows
    monkeypatch.setattr(gpu_check, "rows", lambda *args: table.extend(rows(*args)) or table)
    assert gpu_check.main([]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("gpu_check: llama-tiny, no GPU")
    assert [check for check, *_ in table] == [
        "sparsegpt 50% ppl (cpu fp32, cuda fp16)", "wanda 50% ppl (cpu fp32, cuda fp16)", "calibration batch 1 -> 8",
        "2:4 linear 11008x4096 fp16 speed-up", "cfsp 50% prefill speed-up", "multi-GPU placement"]
    assert all(cuda == gpu_check.SKIPPED for _, _, cuda, _ in table)
    assert all(check in printed and cpu in printed for check, cpu, _, _ in table)
    assert all(math.isfinite(float(cpu)) for _, cpu, _, _ in table[:2])
    assert float(table[4][1].rstrip("x")) > 0
