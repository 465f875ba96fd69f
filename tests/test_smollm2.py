"""The real default model: the paper's ordering at 50% holds on SmolLM2-135M (small protocol)."""
from __future__ import annotations

import copy

import pytest

import methods
from bench import data, models
from bench.core import engine, perplexity
from bench.core.families import measured_sparsity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(shared_data):
    from tests.conftest import compose_config
    from bench.config import validate

    cfg = validate(compose_config("model=smollm2-135m", f"data.dir={shared_data}"))
    model, tokenizer = models.load(cfg.model)
    calib = data.load_corpus("wikitext2", "validation", str(shared_data), "calib")
    samples = data.calibration_samples(data.tokenize(tokenizer, calib.text), 8, 256, seed=0)
    test = data.load_corpus("wikitext2", "test", str(shared_data), "eval")
    windows = data.eval_windows(data.tokenize(tokenizer, test.text), 256, 6, "wikitext2")
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
