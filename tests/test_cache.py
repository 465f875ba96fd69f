"""The cross-cell cache never serves a value computed by older code: every key carries a fingerprint of
the modules that compute its kind; and its command line lists and clears the entries."""
from __future__ import annotations

import subprocess
import sys

import torch

from bench import cache as caching
from tests.conftest import ROOT, TINY


def test_a_code_change_to_a_cached_stage_invalidates_only_its_entries(make_config, tmp_path, monkeypatch):
    cfg, _ = make_config("model=llama-tiny", "method=dense", *TINY)
    shared = caching.for_cell(True, cfg.model, cfg.method, root=tmp_path)
    windows = torch.randint(0, 256, (2, 16))
    computed = []

    def compute(kind):
        return lambda: computed.append(kind) or torch.ones(1)

    for _ in range(2):
        shared.dense_ppl(windows, "cpu", compute("ppl"))
        shared.tokens("some text", compute("tokens"))
    assert computed == ["ppl", "tokens"]  # the second round came from disk

    original = caching._source
    monkeypatch.setattr(caching, "_source",  # as if bench/core/perplexity.py had been fixed
                        lambda module: original(module) + (b"\n# fixed" if module == "bench.core.perplexity" else b""))
    shared.dense_ppl(windows, "cpu", compute("ppl"))
    shared.tokens("some text", compute("tokens"))
    assert computed == ["ppl", "tokens", "ppl"]  # perplexity recomputed; tokenization's code did not change


def test_the_fingerprint_follows_the_source_file(tmp_path, monkeypatch):
    (tmp_path / "stage_under_test.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = caching.code_fingerprint(["stage_under_test", "bench.core.engine"])
    assert caching.code_fingerprint(["bench.core.engine", "stage_under_test"]) == before  # order-free
    (tmp_path / "stage_under_test.py").write_text("VALUE = 2\n")
    assert caching.code_fingerprint(["stage_under_test", "bench.core.engine"]) != before


def test_cache_command_lists_and_clears(tmp_path):
    env = {"PRUNEBENCH_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    (tmp_path / "cells" / "tokens").mkdir(parents=True)
    (tmp_path / "cells" / "tokens" / "a.safetensors").write_bytes(b"x" * 2048)

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "bench.cache", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "tokens: 1 entries" in run("list")
    assert "tokens: removed 1 entries" in run("clear", "--kind", "tokens")
    assert not (tmp_path / "cells" / "tokens").exists()
    assert "tokens: 0 entries" in run("list", "--kind", "tokens")
