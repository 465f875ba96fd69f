"""Shared fixtures: compose real configs from conf/ (the same path run.py takes) for tiny models."""
from __future__ import annotations

import atexit
import fcntl
import importlib.util
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest
from omegaconf import OmegaConf

if "PYTEST_XDIST_WORKER" in os.environ:
    # Workers side by side on few cores: an OpenMP thread waiting at a barrier sleeps instead of spinning on a
    # core the other worker's threads need (spinning made a 24 s test take 80 s beside another). Read when
    # torch loads its OpenMP runtime, so before anything below imports torch; cells inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.compose import compose
from bench.config import validate
from bench.launcher import PRELOAD

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


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The dir `build(dir)` filled, once per test session: under `-n N` a module's tests may run on several
    workers, each with its own module fixtures; the first to get here builds (holding a lock), the others
    wait for it and reuse what it built (pytest-xdist's documented pattern for expensive fixtures)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / name  # the workers' common dir
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".built").exists():
            root.mkdir(exist_ok=True)
            build(root)
            (root / ".built").touch()
    return root


# What `run_py`'s server imports once per session: what run.py's cells import (the local launcher's
# preload), run.py itself, and the table a single run prints.
RUN_PY_PRELOAD = [*PRELOAD, "run", "reports.collect", "tests.conftest"]


def run_py(arguments: Sequence[str], cwd: Path = ROOT, env: Optional[dict] = None, timeout: float = 600,
           stderr_to_stdout: bool = False) -> subprocess.CompletedProcess:
    """`python run.py *arguments` in `cwd` with `env` (default: this process's), as a subprocess would run
    it: its own process, exit status, stdout and stderr; but forked from a server that imported the
    harness once per test session, not a new interpreter importing torch, transformers and Hydra again
    (~6 s each on the 2-core machine). Environment variables read when a package is imported (PYTHONPATH
    hooks, OMP_NUM_THREADS) come from the server's start, so the tests of start-up itself, and those that
    signal a process group, start a real interpreter."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(RUN_PY_PRELOAD)  # read when the first call starts the server
    argv = [str(ROOT / "run.py"), *arguments]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        process = context.Process(target=_run_py_child, args=(
            argv, str(cwd), dict(os.environ if env is None else env), str(out), str(out if stderr_to_stdout else err)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        return subprocess.CompletedProcess([sys.executable, *argv], process.exitcode, out.read_text(),
                                           None if stderr_to_stdout else err.read_text())


def _run_py_child(argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for path, fd in ((out, 1), (err, 2)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = argv
    sys.path.insert(0, str(ROOT))  # a script's own folder comes first on its path
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:  # as the interpreter exits on it: a message goes to stderr, status 1
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The suite's longest tests, started first when pytest-xdist runs it on several workers (the README's `-n 2`):
# the real-model ordering test (~4 min, both cores) beside the Slurm tests (mostly waiting on Slurm), and the
# short tests packed around them (the scheduling options are in pyproject.toml).
LONGEST_FIRST = ("tests/test_smollm2.py", "tests/test_slurm.py")


def pytest_collection_modifyitems(config, items):
    if "PYTEST_XDIST_WORKER" in os.environ:  # the workers' collections are what the controller hands out
        def rank(item):
            path = item.nodeid.split("::")[0]
            return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
        items.sort(key=rank)
