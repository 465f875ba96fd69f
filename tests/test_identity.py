"""One identity policy (`bench.core.identity`) for the config hash and the table rows, the baseline flag of
the record, and the pairing of a cell with its baseline."""
from __future__ import annotations

import copy
import json

import pytest
from omegaconf import OmegaConf

from bench.compose import compose
from bench.config import validate
from bench.core import identity, records

CONFIG = {"model": {"name": "llama-tiny", "source": "random", "dtype": "float32"},
          "method": {"name": "wanda", "display": "Wanda", "pruner": "wanda", "seed": 0},
          "data": {"calib": {"dataset": "pydoc", "nsamples": 4, "batch": 1}}, "eval": {"ppl": {"datasets": ["pydoc"]}},
          "sparsity": 0.5, "seed": 0, "protocol": "quick", "device": "cpu", "save_dir": None, "save_format": "dense",
          "targets": [], "paper_protocol": None, "logger": {"name": "none"}, "rerun": "failed", "cache": False,
          "resume_every_s": 300, "threads": 2}


def test_the_config_hash_is_the_one_finished_cells_were_written_with():
    # A protocol, not a magic number: a sweep resumed after a change of the hash would run every finished
    # cell again. These are the hashes the code before the identity policy moved to bench.core.identity
    # computed (bench.provenance.config_hash at a48abd4), for a literal config and for the README's sweep.
    assert identity.config_hash(CONFIG) == "38a5bdb26f7a0ec4"
    batched = copy.deepcopy(CONFIG)
    batched["data"]["calib"]["batch"] = 4
    assert identity.config_hash(batched) == "420629c904e5c6aa"
    earlier = copy.deepcopy(CONFIG)  # no batch key (written before it existed), other non-numeric values
    del earlier["data"]["calib"]["batch"]
    earlier.update(device="cuda", save_dir="/x")
    earlier["method"]["display"] = "W"
    assert identity.config_hash(earlier) == "38a5bdb26f7a0ec4"


@pytest.mark.parametrize("overrides, expected", [
    (["method=dense", "sparsity=0.5"], "2148ecd2253af655"),
    (["method=sparsegpt", "sparsity=0.5"], "2a4d0d4b170e937e"),
    (["method=wanda", "sparsity=0.5"], "323fa6149577a51b"),
    (["method=magnitude", "sparsity=0.5"], "3e591cd36d8cdb20"),
    (["model=llama-tiny", "method=owl_wanda", "sparsity=0.7", "seed=1", "eval=[ppl,zeroshot]"], "849876971b2f3b96"),
    # as main (9d15fe7) hashed them before method.realised_pruner existed: the key only adds a record field
    (["method=loss_estimate", "sparsity=0.5"], "8a543261403241d5"),
    (["model=llama-tiny", "method=loss_estimate_wanda", "sparsity=0.7", "seed=1"], "65585380dd193dd4"),
])
def test_readme_sweep_cells_keep_their_hash(overrides, expected, monkeypatch):
    # the README's default sweep (method=dense,sparsegpt,wanda,magnitude sparsity=0.5) and a seeded
    # zero-shot cell, hashed by the code before this policy: a change of conf/ that alters what these
    # cells resolve to fails here, since their finished results would no longer be found on resume.
    # `data.dir` resolves from $PRUNEBENCH_DATA and is part of the identity, so the hashes are pinned at
    # the corpora dir they were first computed with, not at whatever dir the machine running this sets.
    monkeypatch.setenv("PRUNEBENCH_DATA", "/work/shared/data")
    cfg = compose(overrides)
    assert identity.config_hash(validate(cfg).recorded(OmegaConf.to_container(cfg, resolve=True))) == expected


@pytest.mark.parametrize("key, value", [("device", "cuda"), ("save_dir", "/tmp/x"), ("paper_protocol", {"x": 1}),
                                        ("method.display", "W"), ("logger.name", "wandb"), ("resume_every_s", None)])
def test_a_key_that_changes_no_number_splits_neither_the_hash_nor_the_row(key, value):
    changed = _set(CONFIG, key, value)
    assert identity.config_hash(changed) == identity.config_hash(CONFIG)
    assert identity.row_identity(changed) == identity.row_identity(CONFIG)


@pytest.mark.parametrize("key, value", [("seed", 1), ("method.seed", 1), ("sparsity", 0.7), ("model.name", "other")])
def test_the_tables_axes_split_the_hash_but_not_the_row(key, value):
    changed = _set(CONFIG, key, value)
    assert identity.config_hash(changed) != identity.config_hash(CONFIG)
    assert identity.row_identity(changed) == identity.row_identity(CONFIG)


def test_a_key_that_changes_numbers_splits_both():
    changed = _set(CONFIG, "data.calib.nsamples", 8)
    assert identity.config_hash(changed) != identity.config_hash(CONFIG)
    assert identity.row_identity(changed)["data.calib.nsamples"] == "8"


def _set(config: dict, key: str, value) -> dict:
    config = copy.deepcopy(config)
    *path, leaf = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[leaf] = value
    return config


# --- the baseline --------------------------------------------------------------------------------

def _record(method: str, extra: dict = None, schema: int = 3) -> dict:
    return {"schema": schema, "status": "ok", "config_hash": method, "metrics": {},
            "cell": {"model": "m", "method": method, "sparsity": 0.0, **(extra or {})}}


@pytest.mark.parametrize("method, baseline", [("dense", True), ("wanda", False)])
def test_a_record_before_schema_4_is_the_baseline_iff_its_method_is_dense(tmp_path, method, baseline):
    records.write_json_atomic(tmp_path / records.RESULT_FILE, _record(method))
    assert records.read_result(tmp_path / records.RESULT_FILE).cell.baseline is baseline


def test_the_record_says_whether_it_is_the_baseline_whatever_the_method_is_named(tmp_path):
    records.write_json_atomic(tmp_path / records.RESULT_FILE, _record("no_pruning", {"baseline": True}, schema=4))
    result = records.read_result(tmp_path / records.RESULT_FILE)
    assert result.cell.baseline and result.schema == records.SCHEMA_VERSION == 4
    assert json.loads(records.write_result(tmp_path, result).read_text())["cell"]["baseline"] is True


def test_a_cell_is_compared_with_the_baseline_of_its_model_seed_protocol_data_and_eval():
    def result(method, seed=0, model="m", zeroshot_limit=20, baseline=None, status="ok"):
        config = {"model": {"name": model}, "seed": seed, "method": {"name": method}, "protocol": "quick",
                  "data": {"calib": {"nsamples": 4}}, "eval": {"zeroshot": {"limit": zeroshot_limit}},
                  "device": "cpu", "sparsity": 0.5}
        cell = records.CellKey(model, method, 0.5, seed=seed, protocol="quick",
                               baseline=method == "dense" if baseline is None else baseline)
        return records.Result(status, method, cell, config=config)
    dense, other_seed = result("dense"), result("dense", seed=1)
    wanda, wanda_1, limited = result("wanda"), result("wanda", seed=1), result("wanda", zeroshot_limit=10)
    elsewhere, failed_dense = result("wanda", model="n"), result("dense", model="n", status="failed")
    paired = records.baselines([wanda, dense, other_seed, wanda_1, limited, elsewhere, failed_dense])
    assert paired[id(wanda)] is dense and paired[id(dense)] is dense and paired[id(wanda_1)] is other_seed
    assert id(limited) not in paired and id(elsewhere) not in paired  # other eval; only a failed baseline
