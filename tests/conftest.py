"""Shared fixtures: compose real configs from conf/ (the same path run.py takes) for tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.config import validate

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
# Small enough for a 2-core CPU: a few short calibration windows and eval windows.
TINY = ["data=pydoc", "eval.ppl.datasets=[pydoc]", "data.calib.nsamples=4", "data.calib.seqlen=64",
        "eval.ppl.seqlen=64", "eval.ppl.max_windows=4"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def compose_config(*overrides: str):
    """The composed DictConfig for these overrides (Hydra's compose API, conf/ as in run.py)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


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
