"""plan=true (bench/plan.py): the cost of a cell from its architecture on the meta device, before it runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from bench import models, plan, placement
from bench.compose import CONF_DIR, compose
from bench.config import validate, zoo_entry
from bench.core import records
from bench.core.vocab import ConfigError
from tests.conftest import run_py

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
NODE = plan.Grant(mem_bytes=64 * GIB, gpus=2, gpu_bytes=80 * GIB, timeout_min=1440, source="given")


def _cfg(*overrides):
    return validate(compose(list(overrides)))


def test_every_hub_preset_ships_its_architecture_with_the_published_parameter_count():
    shipped = json.loads(plan.ARCHITECTURES.read_text())
    presets = [yaml.safe_load(p.read_text()) for p in sorted((CONF_DIR / "model").glob("*.yaml"))]
    assert {p["name"] for p in presets if p["source"] != "random"} <= set(shipped)
    published = {"opt-125m": 0.125, "opt-66b": 65.7, "bloom-560m": 0.559, "bloom-176b": 176.2, "llama-7b": 6.74,
                 "llama2-7b": 6.74, "llama2-13b": 13.0, "llama2-70b": 69.0, "smollm2-135m": 0.135}
    for name, billions in published.items():
        assert plan.shape(shipped[name]).params / 1e9 == pytest.approx(billions, rel=0.005), name


@pytest.mark.parametrize("model", ["llama-tiny", "opt-tiny", "bloom-tiny"])
def test_the_plan_of_a_tiny_model_counts_its_real_parameters_and_bytes(model, tmp_path):
    real = models.load(zoo_entry(model))[0]
    cfg = _cfg(f"model={model}", f"save_dir={tmp_path / 'out'}", "threads=1")
    planned = plan.plan_cell(cfg, NODE)
    assert planned.params == sum(p.numel() for p in real.parameters())
    assert planned.disk_checkpoint == planned.params * 4 == placement.model_bytes(real) - \
        sum(b.numel() * b.element_size() for b in real.buffers())
    assert planned.placement == "in memory" and planned.fits
    assert planned.calib_tokens == cfg.data.calib.nsamples * cfg.data.calib.seqlen
    assert planned.host_peak >= planned.params * 4


def test_llama2_70b_on_64_gib_is_refused_in_memory_and_fits_streamed(tmp_path):
    refused = plan.plan_cell(_cfg("model=llama2-70b", "device=cuda"), NODE)
    assert refused.placement == "in memory" and not refused.fits
    assert refused.host_peak > 128 * GIB
    assert "host RAM" in refused.knob and "model.path=<local checkpoint> model.stream=true" in refused.knob
    (tmp_path / "config.json").write_text(json.dumps(json.loads(plan.ARCHITECTURES.read_text())["llama2-70b"]))
    streamed = plan.plan_cell(_cfg("model=llama2-70b", "device=cuda", f"model.path={tmp_path}",
                                   f"save_dir={tmp_path / 'pruned'}"), NODE)  # stream=auto: over half of 64 GiB
    assert streamed.placement == "streamed" and streamed.fits, streamed.knob
    assert streamed.host_peak < 16 * GIB and streamed.disk_checkpoint == streamed.params * 2


def test_a_gpu_cell_with_too_many_calibration_samples_names_the_count_that_fits_the_host():
    """Every sample's block inputs and outputs stay on the host (the GPU holds one batch of them): 2048 x 4096
    samples of LLaMA-2-70B are 256 GiB of host RAM, the GPU's share one block and one batch."""
    grant = plan.Grant(256 * GIB, 2, 80 * GIB, None, "given")
    overrides = ("model=llama2-70b", "device=cuda", "method=sparsegpt", "data.calib.seqlen=4096")
    planned = plan.plan_cell(_cfg(*overrides, "data.calib.nsamples=2048"), grant)
    assert not planned.fits and "data.calib.nsamples=" in planned.knob and "stay on the host" in planned.knob
    assert planned.host_peak > 2 * 2048 * 4096 * 8192 * 2
    fit = int(planned.knob.split("data.calib.nsamples=")[1].split()[0])
    again = plan.plan_cell(_cfg(*overrides, f"data.calib.nsamples={fit}"), grant)
    assert again.fits, again.knob
    assert planned.gpu_peak == again.gpu_peak < 80 * GIB  # the samples' count does not reach the GPU


def test_a_cpu_cell_too_slow_for_a_gpu_job_is_told_to_use_the_gpu():
    slurm = plan.Grant(64 * GIB, 1, 80 * GIB, 240, "hydra.launcher")
    on_cpu = plan.plan_cell(_cfg("experiment=cfsp_llama2", "method=cfsp"), slurm)
    assert not on_cpu.fits and on_cpu.knob.endswith("device=cuda")
    assert plan.plan_cell(_cfg("experiment=cfsp_llama2", "method=cfsp", "device=cuda"), slurm).fits


def test_a_slurm_grant_is_what_the_launcher_asks_for():
    """hydra.launcher.mem_gb given on the command line wins over model.resources, in the job and the plan."""
    granted = plan.grant({"mem_gb": 512, "gpus_per_node": 4, "timeout_min": 60, "partition": "gpu"})
    assert (granted.mem_bytes, granted.gpus, granted.gpu_bytes, granted.timeout_min) == (512 * GIB, 4, 80 * GIB, 60)
    assert plan.grant(None).source == "this machine"


def test_plan_must_be_a_boolean():
    with pytest.raises(ConfigError, match=r"plan='yes' .*allowed: True, False"):
        plan.plan_mode("yes")


def _run(*args):
    return run_py(["-m", "cache=false", "threads=1", *args], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_plan_true_prints_a_row_per_cell_and_runs_none(tmp_path):
    done = _run("plan=true", "model=llama-tiny,llama2-70b", "method=wanda,sparsegpt", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| cache=False threads=1 model=")]
    assert len(rows) == 4 and "| 68.98B |" in rows[-1]
    assert "Constants: forward" in done.stdout
    assert not list(tmp_path.rglob(records.RESULT_FILE)) and not (tmp_path / records.CELLS_FILE).exists()


def test_a_sweep_is_refused_before_any_cell_when_a_cell_cannot_fit(tmp_path):
    refused = _run("hydra/launcher=slurm", "model=llama-tiny,llama2-70b", "model.resources.mem_gb=64",
                   "method=wanda", f"hydra.sweep.dir={tmp_path}")
    assert refused.returncode != 0
    assert "cell [cache=False threads=1 model=llama2-70b model.resources.mem_gb=64 method=wanda] cannot fit: host " \
           "RAM" in refused.stderr and "plan=true prints the plan" in refused.stderr
    assert not list(tmp_path.rglob(records.RESULT_FILE))


def test_self_pruner_at_70b_holds_the_model_once_plus_the_dense_model_at_its_speed_stage():
    """Its candidates are scored without a copy of the model and the speed reference is loaded at the speed
    stage: on the 384 GiB its preset asks for, no longer model + reference + trial (~385 GiB)."""
    cfg = _cfg("experiment=self_pruner_llama2", "sparsity=0.37", "device=cuda")
    resources = cfg.model.resources
    planned = plan.plan_cell(cfg, plan.Grant(resources.mem_gb * GIB, resources.gpus, 80 * GIB, None, "given"))
    weights = planned.params * 2
    assert weights < planned.host_peak < 2 * weights and "host RAM" not in planned.knob, planned.knob


def test_resume_state_on_disk_is_the_share_of_the_pass_past_the_first_save():
    """Blocks are written every resume_every_s: a pass shorter than that leaves no pruned block on disk (a
    SmolLM2 cell measured 0.50 GiB, its checkpoint, where the plan said 1.01), a 70B pass nearly the model."""
    tiny = ("model=llama-tiny", "method=sparsegpt", "threads=1")
    assert plan.plan_cell(_cfg(*tiny, "resume_every_s=300"), NODE).disk_resume == 0
    every_block = plan.plan_cell(_cfg(*tiny, "resume_every_s=0"), NODE)
    assert every_block.disk_resume > 0
    # what pruning changed: SparseGPT's mask and kept values (about 17/32 of the weights at 50%), Wanda's mask
    big = {method: plan.plan_cell(_cfg("model=llama2-70b", f"method={method}", "device=cuda",
                                       f"resume_every_s={every}"), plan.Grant(1024 * GIB, 2, 80 * GIB, None, "given"))
           for method, every in (("sparsegpt", 300), ("wanda", 0))}  # a Wanda pass is shorter than 300 s
    assert 0.4 * big["sparsegpt"].params * 2 < big["sparsegpt"].disk_resume < 0.6 * big["sparsegpt"].params * 2
    assert 0 < big["wanda"].disk_resume < big["wanda"].params * 2 / 12


def test_a_structured_checkpoint_is_planned_without_the_channels_it_removes(tmp_path):
    """A SmolLM2 CFSP cell at 50% wrote 0.35 GiB where the plan said its dense size, 0.50 GiB."""
    overrides = ("model=llama-tiny", "threads=1", "sparsity=0.5", f"save_dir={tmp_path}")
    dense = plan.plan_cell(_cfg(*overrides, "method=wanda"), NODE).disk_checkpoint
    structured = plan.plan_cell(_cfg(*overrides, "method=cfsp"), NODE).disk_checkpoint
    arch = _cfg("model=llama-tiny").model.architecture
    ffn = 3 * arch["hidden_size"] * arch["intermediate_size"] * arch["num_hidden_layers"]
    assert dense - structured == 0.5 * ffn * 4


def test_a_large_vocabulary_is_planned_with_its_tokenizer_and_one_windows_logits(tmp_path):
    """A Gemma-3-270M cell (262k entries) peaked over a plan that counted neither its tokenizer (measured
    328 MiB) nor one window's fp32 logits and their log-softmax on the CPU (0.25 GiB at seqlen 128)."""
    base = ("model=gemma3-270m", "method=wanda", "threads=1", "eval.ppl.max_windows=4")
    short, long = (plan.plan_cell(_cfg(*base, f"eval.ppl.seqlen={n}"), NODE).host_peak for n in (128, 256))
    assert long - short >= 2 * 128 * 262144 * 4
    planned = {}
    for vocab in (1000, 101000):
        checkpoint = tmp_path / str(vocab)
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text(json.dumps({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab, "tie_word_embeddings": True}))
        planned[vocab] = plan.plan_cell(_cfg("model=llama-tiny", f"model.path={checkpoint}", "method=wanda",
                                             "threads=1", "eval.ppl.seqlen=64"), NODE)
    weights = (planned[101000].params - planned[1000].params) * 4
    assert planned[101000].host_peak - planned[1000].host_peak - weights >= 100000 * (2 * 64 * 4 + 1000)
