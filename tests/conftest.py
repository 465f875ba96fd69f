"""Shared fixtures: compose real configs from conf/ (the same path run.py takes) for tiny models."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench.compose import compose
from bench.config import validate

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
# The README's commands set PRUNEBENCH_DATA=../shared/data, relative to the clone; the tests run cells in
# subprocesses under temporary dirs, where that path names nothing (and a named data dir that does not
# exist is an error), so it is made absolute once, against the dir pytest started in.
if os.environ.get("PRUNEBENCH_DATA"):
    os.environ["PRUNEBENCH_DATA"] = os.path.abspath(os.environ["PRUNEBENCH_DATA"])
# Small enough for a 2-core CPU: a few short calibration windows and eval windows.
TINY = ["data=pydoc", "eval.ppl.datasets=[pydoc]", "data.calib.nsamples=4", "data.calib.seqlen=64",
        "eval.ppl.seqlen=64", "eval.ppl.max_windows=4"]
# A structured cell's speed stage at the fewest tokens: it still runs (dense and pruned, timed), in a fraction of
# a second instead of the defaults' ~20 s on a tiny model, for tests that check something else.
FAST_SPEED = ["eval.speed.repeats=1", "eval.speed.decode_tokens=2", "eval.speed.prefill_seqlen=8"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def compose_config(*overrides: str):
    """The composed DictConfig for these overrides (Hydra's compose API, conf/ as in run.py)."""
    return compose(list(overrides))


def load_script(name: str):
    """A module of scripts/ (run by hand, outside the packages), imported from its file."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def make_config():
    """make_config(*overrides) -> (RunConfig, resolved dict)."""

    def make(*overrides: str):
        cfg = compose_config(*overrides)
        return validate(cfg), OmegaConf.to_container(cfg, resolve=True)

    return make


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ.get("PRUNEBENCH_DATA", SHARED_DATA))
    if not (path / "wikitext2" / "wiki.test.raw").exists():
        pytest.skip(f"WikiText-2 not found under {path}; set PRUNEBENCH_DATA")
    return path

