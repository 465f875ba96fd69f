"""The real default model: the paper's ordering at 50% on SmolLM2-135M, under a protocol where the gap
between SparseGPT and Wanda is many times the spread between calibration draws and machines.

Why this protocol (the README's quick protocol: 32 x 512 WikiText-2 validation calibration tokens,
16 eval windows of 512): with the earlier 8 x 256 calibration (2048 tokens for Hessians of up to 1536
columns, likely too few for SparseGPT's second-order update) SparseGPT and Wanda were level: SparseGPT 76.09 vs Wanda 75.00 (issue 12, seed 0), and Wanda's spread over calibration seeds
there was measured here at 0.72 (seeds 0, 1, 2: 75.00, 75.19, 75.72; dense 37.92); at 70% it is 17%
(seeds 0, 1: 672.3, 797.7), so a higher sparsity is no way out with so little calibration. Under the quick protocol the README's default
sweep gave SparseGPT 65.56 / 65.94 and Wanda 79.06 / 79.12 on two machines (issue 12): a gap of ~13
(20%) against 0.4 between machines and ~1% between seeds (at 8 x 256). The assert keeps a 10% margin,
half the gap.
"""
from __future__ import annotations

import copy

import pytest

import methods
from bench import data, models
from bench.core import engine, perplexity
from bench.core.families import measured_sparsity

pytestmark = pytest.mark.slow

MARGIN = 1.10  # Wanda's ppl over SparseGPT's: ~1.20 in issue 12's runs, machines within 0.6%


@pytest.fixture(scope="module")
def smollm2(shared_data):
    from tests.conftest import compose_config
    from bench.config import validate

    cfg = validate(compose_config("model=smollm2-135m", f"data.dir={shared_data}"))
    model, tokenizer = models.load(cfg.model)
    calib = data.load_corpus("wikitext2", "validation", str(shared_data), "calib")
    samples = data.calibration_samples(data.tokenize(tokenizer, calib.text), 32, 512, seed=0)
    test = data.load_corpus("wikitext2", "test", str(shared_data), "eval")
    windows = data.eval_windows(data.tokenize(tokenizer, test.text), 512, 16, "wikitext2")
    return cfg, model, samples, windows


def test_sparsegpt_beats_wanda_beats_magnitude_at_50_percent(smollm2, make_config):
    _, dense, samples, windows = smollm2
    ppl = {"dense": perplexity.perplexity(dense, windows, "cpu")}
    for name in ("sparsegpt", "wanda", "magnitude"):
        cfg, _ = make_config("model=smollm2-135m", f"method={name}", "sparsity=0.5")
        model = copy.deepcopy(dense)
        engine.prune(model, methods.build(cfg.method), samples, 0.5, "cpu")
        assert measured_sparsity(model)[0] == pytest.approx(0.5, abs=1e-3)
        ppl[name] = perplexity.perplexity(model, windows, "cpu")
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["wanda"] < ppl["magnitude"], ppl
    assert MARGIN * ppl["sparsegpt"] < ppl["wanda"], (
        f"SparseGPT should beat Wanda by > {MARGIN - 1:.0%} (measured ~20%, machines within 0.6%): {ppl}")
