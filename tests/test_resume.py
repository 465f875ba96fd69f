"""A cell interrupted after block k and run again into the same dir resumes its pruning pass at block k
(bench/resume.py) and ends with exactly the weights and perplexities of a cell never interrupted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import plan, resume
from bench.cell import run_cell
from bench.config import ConfigError
from bench.core import records
from methods.allocators.self_pruner import SelfPruner
from tests.conftest import FAST_SPEED, TINY

BLOCKS = 4
CELL = ["model=llama-tiny", f"model.architecture.num_hidden_layers={BLOCKS}", "cache=false", "resume_every_s=0",
        *TINY, *FAST_SPEED]


class Preempted(BaseException):
    """Stands for the SystemExit of Submitit's requeue handler: not an Exception, so the cell re-raises it."""


def _interrupt_after(monkeypatch, block: int) -> None:
    save_block = resume.ResumeState.save_block

    def save_then_stop(self, index, module, next_inputs):
        save_block(self, index, module, next_inputs)
        if index == block:
            raise Preempted

    monkeypatch.setattr(resume.ResumeState, "save_block", save_then_stop)


def _weights(result) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(Path(result.saved_to).glob("*.safetensors"))
            for name, tensor in load_file(file).items()}


@pytest.mark.parametrize("method", [
    "sparsegpt",  # calibrated traversal: the next block's inputs come from the saved state
    "magnitude",  # data-free: no traversal
    "cfsp",  # an allocator and a structured pruner with dense state: blocks change shape
    "flap",  # adds an FFN output bias to LLaMA blocks
])
def test_interrupted_cell_resumes_to_the_uninterrupted_result(method, make_config, tmp_path, monkeypatch):
    overrides = [*CELL, f"method={method}", "sparsity=0.3"]
    cfg, resolved = make_config(*overrides, f"save_dir={tmp_path / 'whole_ckpt'}")
    whole = run_cell(cfg, resolved, tmp_path / "whole")
    assert whole.ok and "resumed_from_block" not in whole.process

    cfg, resolved = make_config(*overrides, f"save_dir={tmp_path / 'resumed_ckpt'}")
    cell_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(Preempted):
            run_cell(cfg, resolved, cell_dir)
    assert records.read_result(cell_dir / records.RESULT_FILE).status == "interrupted"
    state = json.loads((cell_dir / resume.FOLDER / resume.STATE_FILE).read_text())
    assert state["next_block"] == 2

    resumed = run_cell(cfg, resolved, cell_dir)
    assert resumed.ok and resumed.process["resumed_from_block"] == 2
    assert not (cell_dir / resume.FOLDER).exists()  # a finished cell leaves no resume state
    assert resumed.metrics["ppl"] == whole.metrics["ppl"]
    assert resumed.sparsity == whole.sparsity
    expected, got = _weights(whole), _weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_a_resumed_search_is_not_run_again(make_config, tmp_path, monkeypatch):
    overrides = [*CELL, "method=self_pruner_ga", "method.population=2", "method.generations=0",
                 "method.fitness_nsamples=1", "method.fitness_windows=1", "method.rescore_windows=1", "method.fitness_seqlen=16",
                 "sparsity=0.3"]
    cfg, resolved = make_config(*overrides)
    whole = run_cell(cfg, resolved, tmp_path / "whole")
    assert whole.ok
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 0)
        with pytest.raises(Preempted):
            run_cell(cfg, resolved, tmp_path / "resumed")

    def no_search(self, sizes, target):
        raise AssertionError("the search ran again")

    monkeypatch.setattr(SelfPruner, "allocate", no_search)
    resumed = run_cell(cfg, resolved, tmp_path / "resumed")
    assert resumed.ok, resumed.error
    assert resumed.process["resumed_from_block"] == 1
    assert _untimed(resumed.allocator) == _untimed(whole.allocator) and resumed.sparsity == whole.sparsity
    assert resumed.metrics["ppl"] == whole.metrics["ppl"]


def test_a_search_interrupted_midway_resumes_scoring_only_the_candidates_it_had_not_scored(make_config, tmp_path,
                                                                                         monkeypatch):
    """A requeued search replays its choices (same seed, same rates) and takes the fitness of every candidate
    scored before the interruption from the resume state: at 70B each candidate is minutes of pruning."""
    from methods.search import fitness

    overrides = [*CELL, "method=self_pruner_ga", "method.population=3", "method.generations=2",
                 "method.fitness_nsamples=1", "method.fitness_windows=1", "method.rescore_windows=1",
                 "method.fitness_seqlen=16", "sparsity=0.3"]
    cfg, resolved = make_config(*overrides)
    whole = run_cell(cfg, resolved, tmp_path / "whole")
    assert whole.ok, whole.error
    scored = fitness.Fitness._score
    calls = []

    def counted(self, rates, windows, logp, stop_at=None):
        calls.append(windows is self.heldout)
        if stop_at is not None and calls.count(True) > stop_at:
            raise Preempted
        return scored(self, rates, windows, logp)

    with monkeypatch.context() as patch:
        patch.setattr(fitness.Fitness, "_score", lambda *a: counted(*a, stop_at=4))
        with pytest.raises(Preempted):
            run_cell(cfg, resolved, tmp_path / "resumed")
    assert len(json.loads((tmp_path / "resumed" / resume.FOLDER / resume.SEARCH_FILE).read_text())["scores"]) == 4
    calls.clear()
    monkeypatch.setattr(fitness.Fitness, "_score", lambda *a: counted(*a))
    resumed = run_cell(cfg, resolved, tmp_path / "resumed")
    assert resumed.ok, resumed.error
    evaluations = whole.allocator["search"]["evaluations"]
    assert calls.count(True) == evaluations - 4  # the fitness calls; the finalists' re-scores are cheap
    assert _untimed(resumed.allocator) == _untimed(whole.allocator) and resumed.metrics == whole.metrics


def _untimed(record):
    """The record without its wall times (`seconds`), which differ between any two runs."""
    if isinstance(record, dict):
        return {k: _untimed(v) for k, v in record.items() if k != "seconds"}
    if isinstance(record, list):
        return [_untimed(v) for v in record]
    return record


def test_state_of_another_config_is_never_resumed(make_config, tmp_path, monkeypatch):
    cell_dir = tmp_path / "cell"
    cfg, resolved = make_config(*CELL, "method=wanda", "sparsity=0.5")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(Preempted):
            run_cell(cfg, resolved, cell_dir)

    other_cfg, other = make_config(*CELL, "method=wanda", "sparsity=0.6")
    result = run_cell(other_cfg, other, cell_dir)
    assert result.ok and "resumed_from_block" not in result.process
    assert any("saved for another config_hash" in w and "started from scratch" in w for w in result.warnings)
    fresh = run_cell(other_cfg, other, tmp_path / "fresh")
    assert result.metrics["ppl"] == fresh.metrics["ppl"]


def test_a_torn_state_starts_from_scratch(make_config, tmp_path, monkeypatch):
    """A block file lost after its commit (a disk cleaned by hand): the state is not trusted."""
    cell_dir = tmp_path / "cell"
    cfg, resolved = make_config(*CELL, "method=wanda", "sparsity=0.5")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(Preempted):
            run_cell(cfg, resolved, cell_dir)
    assert sorted(p.name for p in (cell_dir / resume.FOLDER).glob("inputs_*")) == ["inputs_3.safetensors"]
    (cell_dir / resume.FOLDER / "block_1.safetensors").unlink()
    result = run_cell(cfg, resolved, cell_dir)
    assert result.ok and "resumed_from_block" not in result.process
    assert any("block files [1] are missing" in w for w in result.warnings)


def test_resume_every_s_is_checked(make_config):
    with pytest.raises(ConfigError, match=r"resume_every_s=-1 is out of range; allowed: seconds >= 0"):
        make_config("model=llama-tiny", "resume_every_s=-1")
    cfg, _ = make_config("model=llama-tiny", "resume_every_s=null")
    assert cfg.resume_every_s is None


@pytest.mark.parametrize("method, share", [
    ("wanda", 1 / 25),  # the kept weights are the dense ones: a 1-bit mask per fp32 weight (1/32)
    ("sparsegpt", 0.6),  # the kept weights are updated: the mask and the half of the values kept (17/32)
])
def test_resume_state_on_disk_is_what_pruning_changed_as_the_plan_says(method, share, make_config, tmp_path,
                                                                      monkeypatch):
    """The default resume_every_s kept every pruned block whole: about 128 GiB under a 70B cell's dir. A
    block's file holds only what pruning changed against the dense weights a resumed cell loads anyway, and
    the plan's resume disk is the peak measured under the cell's resume folder."""
    cfg, resolved = make_config(*CELL, "model.architecture.hidden_size=256", "model.architecture.intermediate_size=768",
                                f"method={method}", "sparsity=0.5")
    sizes = []
    save_block = resume.ResumeState.save_block

    def save_and_measure(self, index, module, next_inputs):
        save_block(self, index, module, next_inputs)
        sizes.append({p.name: p.stat().st_size for p in self.root.iterdir()})

    monkeypatch.setattr(resume.ResumeState, "save_block", save_and_measure)
    assert run_cell(cfg, resolved, tmp_path / "cell").ok
    blocks = sum(size for name, size in sizes[-1].items() if name.startswith("block_"))
    shape = plan.shape(plan.architecture(cfg))
    assert blocks < share * shape.blocks * shape.block_params * 4
    peak = max(sum(files.values()) for files in sizes)
    planned = plan.plan_cell(cfg, plan.Grant(64 * 2**30, 0, 0, None, "given")).disk_resume
    assert 0.8 < peak / planned < 1.2, (peak, planned)
