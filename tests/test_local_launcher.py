"""The local launcher (`hydra/launcher=local`): each cell's job is forked from one process that imported the
harness once per sweep, and keeps what Submitit's local executor gave it: its own process and log, its time
limit, all cells of a batch at once, a failure that stays in its cell."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle

from bench import launcher
from bench.core import records
from tests.conftest import ROOT, TINY

# Counts, in a file, the processes that import the harness and transformers' model code (sitecustomize runs in
# every interpreter started with this dir on PYTHONPATH; a forked process has its parent's modules).
IMPORT_COUNTER = '''
import os, sys, time

if "multiprocessing.forkserver" in " ".join(sys.orig_argv):
    with open({log!r}, "a") as handle:
        handle.write(f"forkserver {{os.getpid()}} {{time.time()}}\\n")

class _Counter:
    def find_spec(self, name, path=None, target=None):
        if name in ("bench.cell", "transformers.modeling_utils"):
            with open({log!r}, "a") as handle:
                handle.write(f"{{name}} {{os.getpid()}}\\n")
        return None

sys.meta_path.insert(0, _Counter())

try:
    from hydra._internal import config_loader_impl
except ImportError:
    pass
else:  # every compose of a cell's config once the sweep's validation has written cells.json
    _load = config_loader_impl.ConfigLoaderImpl.load_configuration

    def _counted(self, *args, **kwargs):
        if os.path.exists({cells!r}):
            with open({log!r}, "a") as handle:
                handle.write(f"compose {{os.getpid()}}\\n")
        return _load(self, *args, **kwargs)

    config_loader_impl.ConfigLoaderImpl.load_configuration = _counted
'''


def test_a_local_sweep_imports_the_harness_once_and_runs_each_cell_in_its_own_logged_process(tmp_path):
    """Before: Submitit started a fresh interpreter per cell, which imported hydra, torch, transformers and
    the harness again (16-18 s a cell on the loaded 2-core machine; 4 imports here)."""
    hook, imports, sweep_dir = tmp_path / "hook", tmp_path / "imports.txt", tmp_path / "sweep"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(IMPORT_COUNTER.format(log=str(imports), cells=str(sweep_dir / "cells.json")))
    proc = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=local", "hydra.sweeper.max_batch_size=2",
                           "cache=false", "model=llama-tiny", *TINY, "method=magnitude,wanda", "sparsity=0.5,0.6",
                           f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = records.read_results(sweep_dir).records
    assert len(results) == 4 and all(result.ok for result in results), [r.error for r in results]
    imported = imports.read_text().splitlines()
    assert len([line for line in imported if line.startswith("bench.cell ")]) == 1  # the fork server, for 4 cells
    # what transformers imports lazily for a model class (3 s a job): the sweep's validation and the server
    assert len([line for line in imported if line.startswith("transformers.modeling_utils ")]) == 2
    # each cell's job: its own process (hydra.job.id is its pid) and its own log, as Submitit named them
    logs = sorted(sweep_dir.glob(".submitit/*/*_0_log.out"))
    assert len(logs) == 4 and len({log.parent.name for log in logs}) == 4
    for log in logs:
        assert log.name == f"{log.parent.name}_0_log.out" and (log.parent / f"{log.parent.name}_0_log.err").exists()
    assert "] 4 cells: 4 done, 0 running, 0 failed, 0 waiting" in proc.stdout  # the live status
    # the server was started with the sweep's first line, so its imports ran beside the validation, which
    # ends by writing cells.json (before: after it, when the first cell's job was started)
    (server,) = [line.split() for line in imported if line.startswith("forkserver ")]
    assert float(server[2]) < (sweep_dir / "cells.json").stat().st_mtime
    # each cell's config is composed once, by the validation: not again by Hydra's sweeper and the launcher
    # in the sweep's process, nor by its job (before: 3 more composes a cell)
    assert not [line for line in imported if line.startswith("compose ")]


def _job(tmp_path: Path, name: str, call, timeout_s: float = 60.0) -> launcher.Job:
    return launcher.Job(name, cloudpickle.dumps(call), str(tmp_path / ".submitit" / "%j"), timeout_s, 0, False)


def _runs(path: Path):
    def run():
        with open(path, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        print(f"running in {os.getpid()} with CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
        time.sleep(30)
    return run


def _dies():
    print("about to die")
    os._exit(3)


def test_jobs_run_at_once_each_with_its_log_a_time_limit_and_a_failure_of_its_own(tmp_path, caplog):
    started = time.monotonic()
    jobs = [_job(tmp_path, "#0", lambda: (time.sleep(1), os.getpid())[1]),
            _job(tmp_path, "#1", _dies),
            _job(tmp_path, "#2", _runs(tmp_path / "runs.txt"), timeout_s=3.0),
            _job(tmp_path, "#3", lambda: (time.sleep(1), os.getpid())[1])]
    returns = launcher.run_jobs(jobs, max_num_timeout=1)
    assert time.monotonic() - started < 25  # the sleeping job was stopped at its limit, twice
    assert returns[1] is None and returns[2] is None  # no result: the others are unaffected
    assert returns[0] != returns[3] and os.getpid() not in returns  # a process each
    assert len(set((tmp_path / "runs.txt").read_text().split())) == 2  # out of time, run again once
    assert "cell #2 ran out of time (hydra.launcher.timeout_min=0.05); running it again" in caplog.text
    assert "cell #1: its process ended without a result (exit code 3)" in caplog.text
    logs = {log.parent.name: log.read_text() for log in tmp_path.glob(".submitit/*/*_0_log.out")}
    assert sum("about to die" in text for text in logs.values()) == 1
    assert sum("CUDA_VISIBLE_DEVICES=''" in text for text in logs.values()) == 2  # gpus_per_node=0: none


def test_the_fork_server_has_not_started_cuda_or_counted_devices():
    """A forked job sets CUDA_VISIBLE_DEVICES for its cell: a server that had initialised CUDA (or cached a
    device count) would hand every job its own view instead."""
    check = textwrap.dedent("""
        import importlib, torch
        from bench import launcher
        for name in launcher.PRELOAD:
            importlib.import_module(name)
        print(torch.cuda.is_initialized(), torch.cuda._cached_device_count)
    """)
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["False", "None"], proc.stderr[-2000:]


def test_ctrl_c_stops_a_local_sweep_and_marks_each_running_cell_interrupted(tmp_path):
    """Ctrl-C reaches every process of the sweep's group; the launcher then stops its jobs with SIGTERM, which
    cut short a job still marking its cell: the cell stayed "running"."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "run.py", "-m", "hydra/launcher=local", "hydra.sweeper.max_batch_size=2", "cache=false",
               "model=llama-tiny", "method=sparsegpt", *TINY, "sparsity=0.5,0.6,0.7", f"hydra.sweep.dir={sweep_dir}"]
    # Every block forward sleeps 5 s (tests/slow_blocks): both cells are still pruning when Ctrl-C comes, however
    # fast or loaded the machine (with real work alone, a cell could finish in the second before the signal).
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'slow_blocks'}:{ROOT}", "PRUNEBENCH_TEST_BLOCK_DELAY_S": "5"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:
        deadline = time.monotonic() + 300
        while len(list(sweep_dir.glob("*/progress.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    results = records.read_results(sweep_dir).records
    assert [result.status for result in results] == ["interrupted", "interrupted"], stderr[-2000:]  # the third: none
