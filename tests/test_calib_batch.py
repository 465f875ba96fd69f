"""Calibration in batches (`data.calib.batch`): the same pruning as one sample at a time, up to the order
of floating-point sums, for every family's kwargs (BLOOM folds the batch into its ALiBi tensor, Gemma
has per-layer-type masks); blocks run in the model's dtype, statistics stay fp32."""
from __future__ import annotations

import copy

import pytest
import torch

from bench import models
from bench.config import zoo_entry
from bench.core import engine, families, identity
from methods import catalog, lifecycle
from tests.conftest import TINY


def _samples(n: int = 6, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("preset", ["llama-tiny", "bloom-tiny", "gemma3-tiny", "opt-tiny", "falcon-tiny"])
def test_batched_traversal_gives_the_same_outputs_and_statistics(preset):
    model = models.load(zoo_entry(preset))[0]
    _, kwargs = engine.capture_inputs(model, _samples(5, 40), "cpu", batch=2)
    assert [sorted(by_size) for by_size in kwargs] == [[1, 2]] * len(kwargs)
    seen = {}
    for batch in (1, 2):  # 5 samples in batches of 2: the last batch is smaller
        views = []
        engine.traverse(model, _samples(5, 40), "cpu", "full", views.append, edits=False, desc="test", batch=batch)
        seen[batch] = views
    for one, two in zip(seen[1], seen[2]):
        torch.testing.assert_close(two.outputs, one.outputs, rtol=1e-5, atol=1e-5)
        for name, stats in one.stats.items():
            assert two.stats[name].ntokens == stats.ntokens
            torch.testing.assert_close(two.stats[name].xtx, stats.xtx, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "wanda_sp"])
def test_batch_4_prunes_like_batch_1(method, make_config):
    cfg, _ = make_config("model=llama-tiny", f"method={method}", "sparsity=0.5", *TINY)
    dense, _ = models.load(cfg.model)
    pruned = {}
    for batch in (1, 4):  # 6 samples: batches of 4 and 2
        model = copy.deepcopy(dense)
        lifecycle.prune(model, catalog.build(cfg.method), _samples(), 0.5, "cpu", batch=batch)
        pruned[batch] = model
    one, four, before = (families.prunable_linears(m) for m in (pruned[1], pruned[4], dense))
    assert any(not torch.equal(linear.weight, before[name].weight) for name, linear in one.items())  # it pruned
    for name, linear in one.items():
        assert linear.weight.shape == four[name].weight.shape, name  # structured: the same channels kept
        assert torch.equal(linear.weight == 0, four[name].weight == 0), name
        torch.testing.assert_close(four[name].weight, linear.weight, rtol=1e-4, atol=1e-5)
    ids = _samples(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(pruned[4](ids).logits, pruned[1](ids).logits, rtol=1e-4, atol=1e-4)


def test_blocks_run_in_the_model_dtype_and_statistics_in_fp32():
    model = models.load(zoo_entry("llama-tiny"))[0].to(torch.bfloat16)
    views = []
    engine.traverse(model, _samples(4, 16), "cpu", "full", views.append, edits=False, desc="test", batch=3)
    assert {v.inputs.dtype for v in views} == {v.outputs.dtype for v in views} == {torch.bfloat16}
    stats = [s for v in views for s in v.stats.values()]
    assert {t.dtype for s in stats for t in (s.x_sum, s.sq_sum, s.xtx)} == {torch.float32}


def test_batch_1_keeps_the_cell_identity_of_earlier_results(make_config):
    _, default = make_config("model=llama-tiny", *TINY)
    _, batched = make_config("model=llama-tiny", "data.calib.batch=4", *TINY)
    earlier = copy.deepcopy(default)
    del earlier["data"]["calib"]["batch"]  # a result written before the key existed
    assert identity.config_hash(default) == identity.config_hash(earlier)
    assert identity.config_hash(batched) != identity.config_hash(default)
    assert default["data"]["calib"]["batch"] == 1
