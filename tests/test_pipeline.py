"""End to end on the three tiny architectures: load -> prune -> eval -> result JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench import models, tokenization
from bench.cell import run_cell
from bench.core import engine, families
from methods import catalog, lifecycle
from tests.conftest import ROOT, TINY, run_py


@pytest.mark.parametrize("model", ["opt-tiny", "bloom-tiny", "llama-tiny"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_full_pipeline_writes_complete_result(model, method, make_config, tmp_path):
    cfg, resolved = make_config(f"model={model}", f"method={method}", "sparsity=0.5", *TINY)
    result = run_cell(cfg, resolved, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "ok", saved["error"]
    assert saved["config_hash"] == result.config_hash
    assert abs(saved["sparsity"]["measured"] - 0.5) < 0.01
    ppl = saved["metrics"]["ppl"]["pydoc"]
    assert 1 < ppl < 1e4
    assert saved["provenance"]["packages"]["torch"]
    assert saved["timings"]["prune"] > 0 and saved["peak_memory"]["rss_mb"] > 0


def test_nm_pruned_checkpoint_reloads_identically(make_config, tmp_path):
    import transformers

    from bench.core.families import prunable_linears

    save_dir = tmp_path / "pruned"
    cfg, resolved = make_config("model=llama-tiny", "method=sparsegpt", "method.sparsity_type=2:4",
                                f"save_dir={save_dir}", *TINY)
    result = run_cell(cfg, resolved, tmp_path / "cell")
    assert result.status == "ok", result.error
    assert result.sparsity["measured"] == 0.5
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(save_dir).eval()
    for name, linear in prunable_linears(reloaded).items():
        nonzeros = (linear.weight != 0).reshape(linear.weight.shape[0], -1, 4).sum(-1)
        assert (nonzeros <= 2).all(), name
    # the reloaded model is the pruned one: re-running the cell's pruning gives the same weights
    from bench import models
    from bench import data
    from methods import catalog, lifecycle

    model, tokenizer = models.load(cfg.model)
    corpus = data.load_corpus("pydoc", "validation", None, "calib")
    samples = tokenization.calibration_samples(tokenization.tokenize(tokenizer, corpus.text), 4, 64, cfg.seed)
    lifecycle.prune(model, catalog.build(cfg.method), samples, 0.5, "cpu")
    ids = samples[:1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_dense_cells_of_a_sweep_run_once(make_config, tmp_path):
    first_cfg, first = make_config("model=opt-tiny", "method=dense", "sparsity=0.5", *TINY)
    second_cfg, second = make_config("model=opt-tiny", "method=dense", "sparsity=0.7", *TINY)
    done = run_cell(first_cfg, first, tmp_path / "0", sweep_dir=tmp_path)
    again = run_cell(second_cfg, second, tmp_path / "1", sweep_dir=tmp_path)
    assert again.config_hash == done.config_hash
    assert not (tmp_path / "1" / "result.json").exists()


@pytest.mark.parametrize("method, extra, stages", [
    ("magnitude", [], ["prune"]),  # data-free: no traversal
    ("wanda", [], ["prune"]),
    ("cfsp", ["method.round_to=32", "sparsity=0.25"], ["dense_statistics", "prune"]),
])
def test_engine_reports_each_block_of_each_pass_as_it_is_done(method, extra, stages, make_config):
    """`on_step` hears of every block of the dense pass and the pruning pass, in order, while they run:
    when block i of the pruning pass is reported, it is pruned and block i + 1 is not yet."""
    cfg, _ = make_config("model=llama-tiny", f"method={method}", *extra, *TINY)
    model, _ = models.load(cfg.model)
    family = families.arch_for(model)
    blocks = list(family.blocks(model))
    widths = families.ffn_sizes(model)
    samples = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    done = []

    def pruned(index: int) -> bool:
        if method == "cfsp":
            return families.ffn_sizes(model)[index] < widths[index]
        weights = [linear.weight for linear in family.linears(blocks[index]).values()]
        return sum(int((w == 0).sum()) for w in weights) > 0.4 * sum(w.numel() for w in weights)

    def on_step(stage: str, index: int, total: int, seconds: float) -> None:
        assert seconds > 0 and total == len(blocks)
        if stage == "prune":
            assert pruned(index) and (index + 1 == len(blocks) or not pruned(index + 1))
        done.append((stage, index))

    lifecycle.prune(model, catalog.build(cfg.method), samples, cfg.sparsity, "cpu", on_step=on_step)
    assert done == [(stage, index) for stage in stages for index in range(len(blocks))]


def test_python_entry_point_runs_a_cell_in_a_fresh_interpreter_and_returns_its_record(tmp_path):
    code = ("import prunebench, sys\n"
            "result = prunebench.run(['model=llama-tiny', 'method=magnitude', 'sparsity=0.5', 'threads=1', "
            + ", ".join(repr(o) for o in TINY) + f", 'save_dir={tmp_path / 'ckpt'}'], "
            f"out_dir={str(tmp_path / 'cell')!r})\n"
            "print(type(result).__name__, result.status, round(result.sparsity['measured'], 2), "
            "result.metrics['ppl']['pydoc'] > 1)\n"
            "model, tokenizer = prunebench.load(result)\n"
            "from bench.core import families\n"
            "print(type(model).__name__, round(families.measured_sparsity(model)[0], 2), model.training)\n"
            "try:\n    prunebench.run(['method.sparsity_typ=2:4'])\n"
            "except prunebench.ConfigError as exc:\n    print('ConfigError', exc)\n"
            "result.saved_to = None\n"
            "try:\n    prunebench.load(result)\n"
            "except prunebench.ConfigError as exc:\n    print('ConfigError', exc)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "Result ok 0.5 True"
    assert lines[1] == "LlamaForCausalLM 0.5 False"  # the pruned model on request, ready to use
    assert (tmp_path / "cell" / "result.json").exists()
    assert lines[2].startswith("ConfigError ") and "sparsity_type" in lines[2]  # one line, did you mean
    assert lines[3].startswith("ConfigError ") and "save_dir=<dir>" in lines[3]


def test_a_single_run_ends_by_saying_where_its_result_and_checkpoint_are(tmp_path):
    # before: the table alone; the timestamped dir under outputs/ was the user's to find
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text("not a record")  # so the cell's dir is `run.1`, not the one asked
    proc = run_py(["model=llama-tiny", "method=magnitude", "threads=1",
                   "cache=false", "eval.speed=null", *TINY, f"save_dir={tmp_path / 'ckpt'}",
                   f"hydra.run.dir={tmp_path / 'run'}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2:] == [f"prunebench: result in {tmp_path / 'run.1' / 'result.json'}",
                                                     f"prunebench: checkpoint in {tmp_path / 'ckpt'}"]


def test_layer_wise_perplexity_of_a_cell_runs_several_windows_per_block_forward_with_the_same_numbers(
        tmp_path, monkeypatch):
    import prunebench
    sizes = []
    run_block_form = engine.run_block_form
    monkeypatch.setattr(engine, "run_block_form", lambda block, inputs, kwargs, device: (
        sizes.append(max(kwargs)), run_block_form(block, inputs, kwargs, device))[1])
    results = {}
    for batch in (1, 4):
        sizes.clear()
        results[batch] = prunebench.run(["model=llama-tiny", "method=wanda", "sparsity=0.5", "threads=1", "cache=false",
                                         *TINY, "eval.ppl.max_windows=6", "eval.ppl.layerwise=true",
                                         f"eval.ppl.batch={batch}"], out_dir=tmp_path / str(batch))
        assert results[batch].status == "ok", results[batch].error
        assert max(sizes) == batch  # calibration runs one sample at a time, its own data.calib.batch
    assert results[4].metrics["ppl"] == results[1].metrics["ppl"]
    assert results[4].config_hash == results[1].config_hash  # the same cell: a sweep does not run it again


def test_block0_inputs_leave_the_device_batch_by_batch_into_one_host_buffer(monkeypatch):
    """Every window's block-0 inputs were kept on the device and concatenated there (~32 GB for C4 at seqlen
    4096 on a GPU, twice over while concatenating): each batch is copied into one host buffer as it is
    captured, and that buffer is what the walk reads."""
    from bench.core import engine
    from bench.config import zoo_entry

    model = models.load(zoo_entry("llama-tiny"))[0]
    samples = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    held = []
    real = engine._InputCatcher.forward

    def forward(self, hidden_states, *args, **kwargs):
        if self.first:  # what the catcher holds when the next batch arrives
            held.append(self.hidden if isinstance(self.hidden, torch.Tensor) else None)
        return real(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(engine._InputCatcher, "forward", forward)
    hidden, kwargs = engine.capture_inputs(model, samples, "cpu", batch=2)
    embedded = model.get_input_embeddings()(samples)
    assert hidden.device.type == "cpu" and torch.equal(hidden, embedded) and sorted(kwargs[0]) == [1, 2]
    # one buffer of all 5 samples from the second batch on, and the walk reads that very buffer
    assert len(held) == 3 and all(h is not None and h.data_ptr() == hidden.data_ptr() for h in held[1:])
