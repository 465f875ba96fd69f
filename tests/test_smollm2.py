"""The real default model: the paper's ordering at 50% on SmolLM2-135M, under a protocol where the gap
between SparseGPT and Wanda is many times the spread between calibration draws, thread counts and machines.

The protocol is the README's quick one (32 x 512 WikiText-2 validation calibration tokens, 16 eval windows
of 512). With the earlier 8 x 256 calibration, SparseGPT and Wanda were level (SparseGPT 76.09 vs Wanda
75.00, issue 12), so that protocol could not carry an ordering test. Measured spread under the quick
protocol, three calibration seeds (`python run.py -m hydra/launcher=local method=sparsegpt,wanda
seed=0,1,2 sparsity=0.5 threads=1`, 2-core AMD EPYC):
  SparseGPT 66.09 / 67.63 / 65.48 (mean 66.40, std 1.11); Wanda 79.12 / 79.52 / 79.17 (mean 79.27, std 0.22).
threads=2 gives SparseGPT 66.90 at seed 0 (thread count moves it by 1.2%, inside the seed spread), and the
issue's two machines gave 65.56 / 65.94 vs Wanda 79.06 / 79.12. Wanda / SparseGPT is 1.19 on the means and
1.17 at the worst pair; MARGIN asks for 1.10: SparseGPT would have to rise ~5 seed stds to break it.
"""
from __future__ import annotations

import copy

import pytest

from bench import data, models, tokenization
from bench.core import perplexity
from bench.core.families import measured_sparsity
from methods import catalog, lifecycle

pytestmark = pytest.mark.slow

MARGIN = 1.10  # Wanda's ppl over SparseGPT's: 1.19 on seed means, 1.17 at the worst of 3 x 3 seeds


@pytest.fixture(scope="module")
def smollm2(shared_data):
    from tests.conftest import compose_config
    from bench.config import validate

    cfg = validate(compose_config("model=smollm2-135m", f"data.dir={shared_data}"))
    model, tokenizer = models.load(cfg.model)
    calib = data.load_corpus("wikitext2", "validation", str(shared_data), "calib")
    samples = tokenization.calibration_samples(tokenization.tokenize(tokenizer, calib.text), 32, 512, seed=0)
    test = data.load_corpus("wikitext2", "test", str(shared_data), "eval")
    windows = tokenization.eval_windows(tokenization.tokenize(tokenizer, test.text), 512, 16, "wikitext2")
    return cfg, model, samples, windows


def test_sparsegpt_beats_wanda_beats_magnitude_at_50_percent(smollm2, make_config):
    _, dense, samples, windows = smollm2
    ppl = {"dense": perplexity.perplexity(dense, windows, "cpu")}
    for name in ("sparsegpt", "wanda", "magnitude"):
        cfg, _ = make_config("model=smollm2-135m", f"method={name}", "sparsity=0.5")
        model = copy.deepcopy(dense)
        lifecycle.prune(model, catalog.build(cfg.method), samples, 0.5, "cpu")
        assert measured_sparsity(model)[0] == pytest.approx(0.5, abs=1e-3)
        ppl[name] = perplexity.perplexity(model, windows, "cpu")
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["wanda"] < ppl["magnitude"], ppl
    assert MARGIN * ppl["sparsegpt"] < ppl["wanda"], (
        f"SparseGPT should beat Wanda by > {MARGIN - 1:.0%} (measured 17-19% over seeds): {ppl}")
