"""Which linears a method prunes (`method.targets` / `method.ignore`, written as llm-compressor's recipes
write them): the others stay dense, the sparsity is the mean over the selected ones, the protocol records
the selection, and cells at the defaults keep their config hash and protocol id."""
from __future__ import annotations

import json

import pytest
import torch

from bench import models, protocol
from bench.config import ConfigError
from bench.core import families, identity
from methods import catalog, lifecycle
from tests.conftest import TINY, run_py


def test_run_py_leaves_ignored_linears_dense_and_records_the_selection(tmp_path):
    run = run_py(["model=llama-tiny", "method=wanda",
                  "method.ignore=[re:.*mlp.down_proj]", "threads=1", "cache=false", "eval.speed=null", *TINY,
                  f"hydra.run.dir={tmp_path / 'run'}"], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    per_layer = record["sparsity"]["per_layer"]
    assert per_layer and all((rate == 0.0) == name.endswith("mlp.down_proj") for name, rate in per_layer.items())
    assert all(rate == pytest.approx(0.5) for name, rate in per_layer.items() if not name.endswith("down_proj"))
    assert record["protocol"]["fields"]["pruned_linears"] == "targets Linear; ignore re:.*mlp.down_proj"


def test_defaults_keep_earlier_hashes_and_protocol_ids(make_config):
    cfg, resolved = make_config("model=llama-tiny", "method=wanda", *TINY)
    assert resolved["method"]["targets"] == ["Linear"] and resolved["method"]["ignore"] == []
    earlier = json.loads(json.dumps(resolved))
    del earlier["method"]["targets"], earlier["method"]["ignore"]  # a record written before the keys existed
    assert identity.config_hash(resolved) == identity.config_hash(earlier)
    assert "pruned_linears" not in protocol.fields(cfg)
    _, ignoring = make_config("model=llama-tiny", "method=wanda", "method.ignore=[lm_head]", *TINY)
    assert identity.config_hash(ignoring) != identity.config_hash(resolved)


def test_targets_select_by_regex_and_name_with_an_nm_pattern(make_config):
    cfg, _ = make_config("model=llama-tiny", "method=sparsegpt", "method.sparsity_type=2:4",
                         "method.targets=[re:.*self_attn\\..*]", "method.ignore=[model.layers.1.self_attn.o_proj]",
                         *TINY)
    model, _ = models.load(cfg.model)
    samples = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    report = lifecycle.prune(model, catalog.build(cfg.method), samples, cfg.sparsity, "cpu")
    chosen = {n for n in families.prunable_linears(model) if "self_attn" in n} - {"model.layers.1.self_attn.o_proj"}
    assert set(report.rates) == chosen
    _, per_layer = families.measured_sparsity(model)
    assert {n for n, rate in per_layer.items() if rate > 0} == chosen
    assert all(per_layer[n] == 0.5 for n in chosen)


@pytest.mark.parametrize("overrides, message", [
    (("method=cfsp", "method.ignore=[re:.*down_proj]"), "pruner=cfsp_fine removes FFN channels"),
    (("method=dense", "method.targets=[re:.*q_proj]"), "pruner=none prunes nothing"),
    (("method=wanda", "method.ignore=['re:*x']"), "method.ignore: 're:*x' is not a regular expression"),
    (("method=wanda", "method.targets=lm_head"), "method.targets='lm_head' is out of range; allowed: a list"),
    (("method=wanda", "method.targets=[]"), "method.targets=[] is out of range; allowed: a list of at least one"),
])
def test_a_bad_selection_is_one_line_at_validation(make_config, overrides, message):
    with pytest.raises(ConfigError) as caught:
        make_config("model=llama-tiny", *overrides, *TINY)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_selection_of_no_linear_is_refused_naming_the_keys(make_config):
    cfg, _ = make_config("model=llama-tiny", "method=wanda", "method.targets=[re:.*nothing]", *TINY)
    model, _ = models.load(cfg.model)
    with pytest.raises(ConfigError, match=r"method.targets=\['re:.\*nothing'\] less method.ignore=\[\] select none"):
        lifecycle.prune(model, catalog.build(cfg.method), torch.zeros(4, 64, dtype=torch.long), 0.5, "cpu")


def test_a_class_name_selects_its_subclasses_as_every_family_needs():
    """Falcon's linears are FalconLinear: `Linear`, the default target, selected none of them and every
    falcon cell failed."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    from methods.base import matches
    falcon = FalconLinear(4, 4)
    assert matches("Linear", "transformer.h.0.mlp.dense_4h_to_h", falcon)
    assert matches("FalconLinear", "x", falcon) and not matches("FalconLinear", "x", torch.nn.Linear(4, 4))
    assert not matches("Embedding", "x", falcon)
