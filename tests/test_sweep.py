"""Sweeps: every cell validated before any runs, one job array per resource class, the sbatch script
(golden file), Slurm pre-flight errors, resume/skip/rerun, and `reports status`."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import submitit
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from bench import cache as caching
from bench import isolate, launcher, models, sweep
from bench.cell import run_cell
from bench.compose import CONF_DIR, compose
from bench.config import validate
from bench.core import records
from bench.core.vocab import ConfigError
from methods.base import Allocator
from methods import catalog, lifecycle
from reports.status import status
from tests.conftest import ROOT, TINY, run_py

GOLDEN = Path(__file__).parent / "golden" / "slurm_opt-66b.sbatch"


def _primary(*overrides: str):
    """The sweep's primary config, `hydra` node included, as the callback receives it."""
    cfg = compose(list(overrides), with_hydra=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra.job.name}; makes cfg.hydra read-only
    OmegaConf.set_readonly(cfg.hydra, False)  # as the callback gets it in a real multirun
    return cfg


def _cells(hydra_overrides: list[str], *task_overrides: str):
    def compose_cell(overrides):
        return compose(hydra_overrides + overrides, with_hydra=True)

    return sweep.expand(list(task_overrides), compose_cell)


def _sbatch(launcher) -> str:
    """The sbatch script Submitit writes for these launcher params (the mapping of hydra-submitit-launcher's
    launch(): BaseQueueConf keys as is, the rest prefixed with the executor name)."""
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("CELL", "uid")


def test_sbatch_script_for_a_big_model_matches_golden_file():
    cfg = _primary("hydra/launcher=slurm", "model=opt-66b", "hydra.launcher.partition=gpu",
                   "hydra.launcher.account=lab", "hydra.launcher.constraint=a100",
                   "hydra.launcher.setup=[module load cuda/12.1]", "hydra.sweep.dir=/sweep",
                   "+hydra.launcher.additional_parameters.mail-type=END")
    assert _sbatch(cfg.hydra.launcher) == GOLDEN.read_text()


@pytest.mark.parametrize("kind", ["slurm", "local"])
def test_each_model_gets_its_own_job_array_and_resources(kind):
    cells = _cells([f"hydra/launcher={kind}"], "model=llama-tiny,opt-66b,opt-tiny", "method=magnitude,wanda")
    groups = launcher.resource_groups([cell.config.hydra.launcher for cell in cells])
    assert [[cells[i].config.model.name for i in indices] for indices in groups.values()] == \
        [["llama-tiny", "llama-tiny", "opt-tiny", "opt-tiny"], ["opt-66b", "opt-66b"]]  # same resources, one array
    assert [dict(resources) for resources in groups] == [
        {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 4, "timeout_min": 10},
        {"gpus_per_node": 2, "cpus_per_task": 8, "mem_gb": 384, "timeout_min": 1440}]
    explicit = _cells([f"hydra/launcher={kind}", "hydra.launcher.mem_gb=64"], "model=llama-tiny,opt-66b")
    groups = launcher.resource_groups([cell.config.hydra.launcher for cell in explicit])
    assert [dict(resources)["mem_gb"] for resources in groups] == [64, 64]  # given explicitly: every cell


def test_local_launcher_gets_one_cell_at_a_time_unless_told():
    for overrides, expected in (((), 1), (("hydra.sweeper.max_batch_size=3",), 3)):
        primary = _primary("hydra/launcher=local", *overrides)
        sweep._pace_local_launcher(primary)
        assert primary.hydra.sweeper.max_batch_size == expected


def test_a_presets_sweep_params_are_cells_of_the_whole_sweep(tmp_path, caplog, monkeypatch):
    """An experiment's `hydra.sweeper.params` (demo_tiny: 2 models x 3 methods) crossed with the command
    line's `seed=0,1`: every one of the 12 cells is validated (once) and listed in cells.json, which the
    live status counts; a command-line key replaces the preset's sweep of that key."""
    primary = _primary("experiment=demo_tiny", f"hydra.sweep.dir={tmp_path}", "hydra/launcher=local")
    primary.hydra.overrides.task = ["experiment=demo_tiny", "seed=0,1"]  # as a multirun's command line sets it
    callback = sweep.SweepCallback()
    validated = []
    monkeypatch.setattr(sweep, "validate", lambda cfg: validated.append(cfg) or validate(cfg))
    # the grid is under test: opt-125m's cells would be refused offline without it in the hub cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"), caplog.at_level("INFO"):
        callback.on_multirun_start(primary)
        callback.on_multirun_end(primary)
    assert len(validated) == 12
    listed = [cell["overrides"] for cell in records.read_manifest(tmp_path)]
    assert len(listed) == 12 and len({c["config_hash"] for c in records.read_manifest(tmp_path)}) == 12
    swept = sorted(tuple(o for o in cell if o.split("=")[0] in ("model", "method", "seed")) for cell in listed)
    assert swept == sorted((f"model={m}", f"method={p}", f"seed={s}") for m in ("llama-tiny", "opt-125m")
                           for p in ("dense", "magnitude", "wanda") for s in (0, 1))
    assert "sweep of 12 cells validated" in caplog.text
    assert len(status(tmp_path)[0]) == 12

    primary.hydra.overrides.task = ["experiment=demo_tiny", "method=wanda"]
    cells = sweep.cell_overrides(sweep.sweep_arguments(primary))
    assert [cell[:2] for cell in cells] == [["model=llama-tiny", "method=wanda"], ["model=opt-125m", "method=wanda"]]


def _fake_slurm(bin_dir: Path, sinfo_output: str) -> None:
    bin_dir.mkdir()
    for tool, output in (("sbatch", ""), ("sinfo", sinfo_output)):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\nprintf '{output}'\n")
        script.chmod(0o755)


def test_slurm_preflight_errors(tmp_path, monkeypatch):
    cfg = _primary("hydra/launcher=slurm")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="`sbatch` is not on PATH"):
        sweep._check_launcher(cfg)

    _fake_slurm(tmp_path / "nodefault", "gpu\\ncpu\\n")
    monkeypatch.setenv("PATH", str(tmp_path / "nodefault"))
    with pytest.raises(ConfigError, match=r"hydra.launcher.partition=null .* allowed: cpu, gpu"):
        sweep._check_launcher(cfg)
    sweep._check_launcher(_primary("hydra/launcher=slurm", "hydra.launcher.partition=gpu"))

    _fake_slurm(tmp_path / "default", "gpu*\\ncpu\\n")
    monkeypatch.setenv("PATH", str(tmp_path / "default"))
    sweep._check_launcher(cfg)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_py(["-m", "cache=false", *args], env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)


def test_bad_cell_or_missing_sbatch_stops_the_sweep_before_any_cell_runs(tmp_path):
    bad = _run("model=llama-tiny", "method=magnitude", "sparsity=0.5,1.5", *TINY, f"hydra.sweep.dir={tmp_path}/a")
    assert bad.returncode != 0
    assert "sparsity=1.5 is out of range" in bad.stderr and "cell [cache=False model=llama-tiny method=magnitude sparsity=1.5 " in bad.stderr
    no_sbatch = _run("hydra/launcher=slurm", "model=llama-tiny", *TINY, f"hydra.sweep.dir={tmp_path}/b",
                     env={"PATH": str(tmp_path)})
    assert no_sbatch.returncode != 0 and "`sbatch` is not on PATH" in no_sbatch.stderr
    assert not list(tmp_path.rglob(records.RESULT_FILE))


def test_resume_runs_only_failed_cells_then_completes(tmp_path):
    """The c4 cell fails (no such file, fallback off), the pydoc cell succeeds; re-runs of the same command
    skip the done cell and retry the failed one, which succeeds once its data exists."""
    sweep_dir, data_dir = tmp_path / "sweep", tmp_path / "data"
    data_dir.mkdir()
    command = ["model=llama-tiny", "method=magnitude", "data=pydoc,c4", f"data.dir={data_dir}",
               "data.allow_fallback=false", *TINY[1:], f"hydra.sweep.dir={sweep_dir}"]

    def by_data():
        return {r.config["data"]["calib"]["dataset"]: r for r in records.read_results(sweep_dir).records}

    failing = _run(*command)  # the sweep runs past a failed cell, then exits 1 naming it and why
    assert failing.returncode == 1, failing.stderr[-2000:]
    assert "1 cell(s) of the sweep failed" in failing.stderr and "failed: DataUnavailable: corpus 'c4'" in failing.stderr
    first = by_data()
    assert first["pydoc"].status == "ok" and first["c4"].status == "failed"
    assert first["c4"].error.type == "DataUnavailable"
    assert [row.state for row in status(sweep_dir)[0]] == ["done", "failed"]

    from pydoc_data.topics import topics

    (data_dir / "c4").mkdir()
    with gzip.open(data_dir / "c4" / "c4-validation.00000-of-00008.json.gz", "wt") as out:
        out.writelines(json.dumps({"text": text}) + "\n" for text in topics.values())
    assert _run(*command).returncode == 0
    second = by_data()
    assert second["pydoc"].process == first["pydoc"].process  # skipped
    assert second["c4"].status == "ok" and second["c4"].process != first["c4"].process
    assert [row.state for row in status(sweep_dir)[0]] == ["done", "done"]


def test_rerun_all_runs_a_done_cell_again(make_config, tmp_path):
    cfg, resolved = make_config("model=llama-tiny", "method=magnitude", *TINY)
    first = run_cell(cfg, resolved, tmp_path / "0", sweep_dir=tmp_path)
    again = run_cell(cfg, resolved, tmp_path / "1", sweep_dir=tmp_path)
    assert again.path == str(tmp_path / "0" / records.RESULT_FILE)
    assert not (tmp_path / "1" / records.RESULT_FILE).exists()
    forced = run_cell(cfg, resolved, tmp_path / "1", sweep_dir=tmp_path, rerun="all")
    assert forced.status == "ok" and forced.process["started"] > first.process["started"]
    with pytest.raises(ConfigError, match="rerun='some' is not valid; allowed: failed, all"):
        sweep.rerun_mode(OmegaConf.create({"rerun": "some"}))


def test_status_tells_killed_and_missing_cells(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cells = [{"overrides": [f"sparsity={s}"], "config_hash": f"h{s}"} for s in (0.5, 0.6, 0.7)]
    records.write_json_atomic(tmp_path / records.CELLS_FILE, {"cells": cells})
    import socket

    cell = {"model": "m", "method": "x", "sparsity": 0.5}
    records.write_json_atomic(tmp_path / "0" / records.RESULT_FILE,
                              {"schema": 2, "config_hash": "h0.5", "status": "ok", "cell": cell, "metrics": {}})
    records.write_json_atomic(tmp_path / "1" / records.RESULT_FILE, {
        "schema": 2, "config_hash": "h0.6", "status": "running", "cell": cell, "metrics": {},
        "process": {"host": socket.gethostname(), "pid": dead.pid}})
    rows, corrupt = status(tmp_path)
    assert not corrupt
    assert [row.state for row in rows] == ["done", "failed", "missing"]
    assert "killed" in rows[1].detail


def test_status_asks_squeue_once_per_poll_for_every_running_slurm_cell(tmp_path, monkeypatch):
    # before: one squeue per running cell, every 5 s of a watch
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nprintf '101\\n103\\n'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    sweep_dir = tmp_path / "sweep"
    cells = [{"overrides": [f"seed={j}"], "config_hash": f"h{j}"} for j in (101, 102, 103)]
    records.write_json_atomic(sweep_dir / records.CELLS_FILE, {"cells": cells})
    for job in (101, 102, 103):
        records.write_json_atomic(sweep_dir / str(job) / records.RESULT_FILE, {
            "schema": 2, "config_hash": f"h{job}", "status": "running", "metrics": {},
            "cell": {"model": "m", "method": "x", "sparsity": 0.5},
            "process": {"host": "node-7", "pid": 4242, "slurm_job_id": str(job)}})
    rows, _ = status(sweep_dir)
    assert calls.read_text().splitlines() == ["--noheader --format=%A --jobs 101,102,103"]
    assert [row.state for row in rows] == ["running", "failed", "running"]
    assert rows[1].detail == "killed: Slurm job 102 ended without writing a result"


@pytest.mark.parametrize("stderr, expected", [
    # the controller purged job 102: squeue refuses the list, and each job alone tells which one is gone
    ("slurm_load_jobs error: Invalid job id specified", ["running", "failed", "running"]),
    # the controller does not answer: nothing is known of any job, so none is called killed
    ("slurm_load_jobs error: Unable to contact slurm controller", ["running", "running", "running"]),
])
def test_a_failing_batched_squeue_never_calls_every_running_cell_killed(tmp_path, monkeypatch, stderr, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(
        "#!/bin/sh\ncase \"$*\" in\n  *102,*|*,102*|*' 102') "
        f"echo '{stderr}' >&2; exit 1;;\nesac\n"
        "case \"$*\" in *101*) echo 101;; esac\ncase \"$*\" in *103*) echo 103;; esac\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    sweep_dir = tmp_path / "sweep"
    cells = [{"overrides": [f"seed={j}"], "config_hash": f"h{j}"} for j in (101, 102, 103)]
    records.write_json_atomic(sweep_dir / records.CELLS_FILE, {"cells": cells})
    for job in (101, 102, 103):
        records.write_json_atomic(sweep_dir / str(job) / records.RESULT_FILE, {
            "schema": 2, "config_hash": f"h{job}", "status": "running", "metrics": {},
            "cell": {"model": "m", "method": "x", "sparsity": 0.5},
            "process": {"host": "node-7", "pid": 4242, "slurm_job_id": str(job)}})
    rows, _ = status(sweep_dir)
    assert [row.state for row in rows] == expected


def test_cache_reuses_invariant_work_and_changes_no_number(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    cells = {s: make_config("model=llama-tiny", "method=sparsegpt", f"sparsity={s}", *TINY) for s in (0.5, 0.7)}
    first = run_cell(*cells[0.5], tmp_path / "a", cache=True)
    second = run_cell(*cells[0.7], tmp_path / "b", cache=True)
    uncached = run_cell(*cells[0.7], tmp_path / "c")
    assert first.cache == {"hits": [], "misses": ["block0", "tokens", "tokens"]}
    assert second.cache == {"hits": ["block0", "tokens", "tokens"], "misses": []}
    assert second.metrics == uncached.metrics and second.sparsity == uncached.sparsity

    dense = make_config("model=llama-tiny", "method=dense", *TINY)
    assert "dense_ppl" in run_cell(*dense, tmp_path / "d", cache=True).cache["misses"]
    again = run_cell(*dense, tmp_path / "e", cache=True)
    assert "dense_ppl" in again.cache["hits"]


def test_allocator_dense_observations_come_from_the_cache(make_config, tmp_path):
    class Observing(Allocator):  # the dense-pass lifecycle of methods/base.py
        needs_dense_pass, observe_level = True, "diag"

        def __init__(self):
            super().__init__(None)
            self.norms, self.loaded = {}, None

        def observe_block(self, view):
            self.norms.update({name: stats.col_norms().sum().item() for name, stats in view.stats.items()})

        def allocate(self, sizes, target):
            return {name: target for name in sizes}

        def dense_state(self):
            return self.norms

        def load_dense_state(self, state):
            self.loaded = state

    cfg, _ = make_config("model=llama-tiny", "method=magnitude", *TINY)
    samples = torch.randint(0, 256, (2, 16))
    states = []
    for _ in range(2):
        model, _ = models.load(cfg.model)
        method = catalog.build(cfg.method)
        method.allocator = Observing()
        shared = caching.for_cell(True, cfg.model, cfg.method, root=tmp_path)
        lifecycle.prune(model, method, samples, 0.5, "cpu", cache=shared)
        states.append(method.allocator)
    assert states[0].norms and states[1].norms == {}  # the second run did not traverse the dense model
    assert states[1].loaded == states[0].norms


def _killed_midway(out_dir: Path) -> dict:
    records.write_result(out_dir, records.Result("running", "h", records.CellKey("m", "x", 0.5)))
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


def test_a_killed_cell_is_recorded_and_the_sweep_process_lives_on(tmp_path):
    result = isolate.run_isolated(tmp_path, _killed_midway, tmp_path)
    assert result.status == "failed" and "killed by SIGKILL" in result.error.message
    assert json.loads((tmp_path / records.RESULT_FILE).read_text())["status"] == "failed"
    assert isolate.run_isolated(tmp_path, lambda: {"status": "ok"}) == {"status": "ok"}


@pytest.mark.parametrize("method_name", ["owl_wanda", "loss_estimate", "cfsp"])
def test_dense_statistics_of_real_methods_are_cached_and_give_the_same_pruning(method_name, make_config, tmp_path):
    extra = ["method.round_to=1"] if method_name == "cfsp" else []  # the tiny FFN is narrower than 128
    cfg, _ = make_config("model=llama-tiny", f"method={method_name}", "sparsity=0.5", *extra, *TINY)
    samples = torch.randint(0, 256, (2, 32))
    runs = []
    for _ in range(2):
        model, _ = models.load(cfg.model)
        method = catalog.build(cfg.method)
        observed = []
        for component in (method.allocator, method.pruner):
            if component.needs_dense_pass:
                original = component.observe_block
                component.observe_block = lambda view, original=original: (observed.append(view.index), original(view))
        report = lifecycle.prune(model, method, samples, 0.5, "cpu",
                                 cache=caching.for_cell(True, cfg.model, cfg.method, root=tmp_path))
        runs.append((report.rates, observed, {k: v.clone() for k, v in model.state_dict().items()}))
    assert runs[0][1] and not runs[1][1]  # the second run took the dense statistics from the cache
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])


def test_an_unreachable_or_keyless_llm_endpoint_stops_the_sweep_before_any_cell(tmp_path):
    env = {**os.environ, "PB_KEY": "k"}
    env.pop("PB_NO_KEY", None)
    base = ["-m", "model=llama-tiny", "method=self_pruner", "sparsity=0.3,0.5", "method.llm.backend=http",
            "method.llm.base_url=http://127.0.0.1:9/v1"]
    for key_env, message in (("PB_NO_KEY", "environment variable is not set"), ("PB_KEY", "is unreachable")):
        sweep_dir = tmp_path / key_env
        proc = run_py(base + [f"method.llm.api_key_env={key_env}", f"hydra.sweep.dir={sweep_dir}"], env=env,
                      timeout=300)
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not list(sweep_dir.rglob(records.RESULT_FILE))  # no cell ran


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_cell_of_every_shipped_experiment_validates(experiment):
    primary = _primary(f"experiment={experiment}")
    cells = sweep.expand(sweep.sweep_arguments(primary), lambda overrides: compose(overrides, with_hydra=True))
    assert cells and all(f"experiment={experiment}" in cell.overrides for cell in cells)


def test_a_search_scored_with_wanda_runs_once_for_its_wanda_and_sparsegpt_cells(make_config, tmp_path, monkeypatch):
    # the allocator league's two columns: *_sparsegpt search arms score candidates with Wanda (fitness_pruner)
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    search = ["sparsity=0.7", "method.population=3", "method.generations=1", "method.fitness_nsamples=2",
              "method.fitness_windows=1", "method.rescore_windows=1", "method.fitness_seqlen=32", *TINY]
    wanda = run_cell(*make_config("model=llama-tiny", "method=self_pruner_ga", *search), tmp_path / "w", cache=True)
    sparsegpt = make_config("model=llama-tiny", "method=self_pruner_ga_sparsegpt", *search)
    shared = run_cell(*sparsegpt, tmp_path / "s", cache=True)
    alone = run_cell(*sparsegpt, tmp_path / "alone")
    assert wanda.ok and shared.ok and "search" in wanda.cache["misses"] and "search" in shared.cache["hits"]
    assert shared.allocator == wanda.allocator  # the search that ran, its record included
    searched = [[(c["rates"], c["fitness"]) for c in r.allocator["search"]["candidates"]] for r in (shared, alone)]
    assert searched[0] == searched[1]  # what the cell would have found searching itself
    assert shared.metrics == alone.metrics and shared.sparsity == alone.sparsity
    assert shared.metrics != wanda.metrics  # the final prune is the cell's own
    other_seed = run_cell(*make_config("model=llama-tiny", "method=self_pruner_ga_sparsegpt", "seed=1", *search),
                          tmp_path / "seed1", cache=True)
    assert "search" in other_seed.cache["misses"]
