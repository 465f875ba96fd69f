"""What the cheap paths import: `run.py --help` and `--cfg job` answer from Hydra alone, and a cell imports
the heavy packages of the stages it runs only. Each check runs in a fresh interpreter (this process has
imported everything already) and reads its `sys.modules`; how long anything takes is for
scripts/bench_startup.py, not a test."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
from hydra._internal.callbacks import Callbacks
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.types import HydraContext, RunMode

from bench.compose import CONF_DIR
from bench.grid import SweepStart
from bench.sweep import SweepCallback
from reports.callback import CollectTable, SweepProgress
from tests.conftest import ROOT, TINY

HEAVY_FOR_HELP = ("torch", "transformers", "peft", "submitit")  # submitit: Hydra lists our launchers
# The stages that use these are off in a plain tiny cell: recovery (peft), zero-shot (lm_eval, datasets),
# W&B (wandb), the Self-Pruner's LLM backends (openai, xgrammar).
HEAVY_FOR_A_PLAIN_CELL = ("peft", "lm_eval", "wandb", "openai", "xgrammar")


def _imported_by(code: str, tmp_path) -> set[str]:
    """The top-level packages in `sys.modules` after `code` ran in a fresh interpreter at the repo root."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import json, sys
        print("\\nMODULES=" + json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MODULES="))
    return set(json.loads(line.removeprefix("MODULES=")))


@pytest.mark.parametrize("arguments", [["--help"], ["--cfg", "job"], ["--cfg", "job", "model=llama-tiny", "method=wanda"]])
def test_help_and_cfg_import_no_torch(arguments, tmp_path):
    imported = _imported_by(f"""
        import runpy, sys
        sys.argv = ["run.py", *{arguments!r}]
        try:
            runpy.run_path({str(ROOT / "run.py")!r}, run_name="__main__")
        except SystemExit as exc:
            assert not exc.code, exc.code
    """, tmp_path)
    assert not imported & set(HEAVY_FOR_HELP), sorted(imported & set(HEAVY_FOR_HELP))


def _hydras_help(overrides: list[str]) -> str:
    hydra = Hydra.create_main_hydra2(task_name="run", config_search_path=create_config_search_path(str(CONF_DIR)))
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            hydra.app_help(config_name="config", args_parser=get_args_parser(),
                           args=get_args_parser().parse_args(["--help", *overrides]))
    finally:
        GlobalHydra.instance().clear()
    return text.getvalue()


def _run_py_help(overrides: list[str], tmp_path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("overrides", [[], ["model=llama-tiny", "method=wanda", "eval.ppl.seqlen=64"],
                                       ["hydra/help=default"]])
def test_help_prints_hydras_own_text(overrides, tmp_path):
    """run.py writes the text of our help template itself (Hydra fills fields the template does not use,
    at a config repository per group); Hydra's own settings (another template) are left to Hydra."""
    assert _run_py_help(overrides, tmp_path) == _hydras_help(overrides)


def test_a_plain_cell_imports_no_package_of_a_stage_it_skips(tmp_path):
    overrides = ["model=llama-tiny", "recovery=none", "logger=none", "eval=ppl", "threads=1", *TINY]
    imported = _imported_by(f"""
        from omegaconf import OmegaConf
        from bench.cell import run_cell
        from bench.compose import compose
        from bench.config import validate
        for method in ("dense", "wanda"):
            cfg = compose([f"method={{method}}", *{overrides!r}])
            result = run_cell(validate(cfg), OmegaConf.to_container(cfg, resolve=True), method)
            assert result.ok, result.error
    """, tmp_path)
    assert not imported & set(HEAVY_FOR_A_PLAIN_CELL), sorted(imported & set(HEAVY_FOR_A_PLAIN_CELL))


def test_a_sweep_says_how_many_cells_before_it_validates_them(tmp_path):
    """The first line comes from `bench.grid.SweepStart`, the first callback, which Hydra builds before it
    imports the harness for the others: a bad last cell is reported after the count, not instead of it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "model=llama-tiny", "method=wanda",
                           "sparsity=0.5,0.6,1.5", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    output = proc.stdout  # with stderr, in the order the two were written
    assert proc.returncode != 0 and "sweep not started" in output, output[-3000:]
    assert "validating 3 cells ..." in output
    assert output.index("validating 3 cells ...") < output.index("sweep not started")


def test_the_first_line_of_a_sweep_needs_no_torch(tmp_path):
    imported = _imported_by("import bench.grid", tmp_path)
    assert not imported & set(HEAVY_FOR_HELP), sorted(imported & set(HEAVY_FOR_HELP))


class _JobHook(Callback):
    def on_job_start(self, config, **kwargs) -> None:
        pass


def test_a_submitit_cell_carries_only_the_callbacks_that_hook_its_job():
    """Submitit pickles the launcher, Hydra's callbacks with it, into every cell's job; ours act at the sweep's
    start and end only, and unpickled in a cell they would import the reports (pandas, matplotlib) there."""
    # Hydra's first plugin scan executes hydra_plugins' modules again: the class to pickle is the one in
    # sys.modules after that scan, not one imported when this file was collected
    Plugins.instance()
    launcher = importlib.import_module("hydra_plugins.prunebench_launcher").LocalLauncher(submitit_folder="unused")
    callbacks = Callbacks()
    callbacks.callbacks = [SweepStart(RunMode.RUN, None, []), SweepCallback(), CollectTable(), SweepProgress(),
                           _JobHook()]
    launcher.hydra_context = HydraContext(config_loader=None, callbacks=callbacks)
    shipped = pickle.dumps(launcher)
    assert b"reports" not in shipped and b"bench.sweep" not in shipped
    assert [type(c) for c in pickle.loads(shipped).hydra_context.callbacks.callbacks] == [_JobHook]
    assert len(launcher.hydra_context.callbacks.callbacks) == 5  # the sweep's own process keeps them all
