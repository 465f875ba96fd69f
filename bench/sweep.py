"""Sweep-level checks and bookkeeping, run once on the submitting machine before any cell starts.

`SweepCallback` is registered in conf/config.yaml (`hydra.callbacks`). On `python run.py -m ...` it:
- expands the sweep's cross product (the command line's overrides and `hydra.sweeper.params`, the sweep
  a preset declares) and validates every cell (`bench.config.validate`), so a typo in the
  last value of a sweep fails before anything is submitted, naming the cell, the key and the value;
- checks the Slurm side before submitting: `sbatch` on PATH, a partition where the cluster has no default;
- hands the local launcher one cell at a time by default (it starts every cell it gets at once);
  our launchers themselves (bench/launcher.py) give each cell its own model's resources;
- locks the sweep dir (`.prunebench.lock`, held until the sweep ends or its process dies), so a second
  sweep into the same dir stops instead of interleaving with it;
- writes `cells.json` in the sweep dir (`bench.core.records.write_manifest`) (overrides + config hash of every
  cell), which `python -m reports status` compares with the result files; an earlier sweep's cells
  already listed there are kept (merged), so a different sweep into an old dir loses none of them; and
  logs how many cells are already done.

Each cell then runs in its own forked process (`bench.isolate.run_isolated`, called by run.py).

Resume: a cell whose config hash already has an `ok` result under the sweep dir is skipped
(`bench.cell.find_completed`); failed, missing and interrupted ("running" but dead) cells run again.
`+rerun=all` re-runs every cell. To resume a sweep, re-run the same command with
`hydra.sweep.dir=<its dir>` (the default dir is timestamped, so a plain re-run starts a new sweep).
"""
from __future__ import annotations

import copy
import errno
import fcntl
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from bench import llm, models, plan
from bench.config import ConfigError, RunConfig, validate
from bench.core import identity, records
from bench.core.records import CorruptResult
from bench.grid import LOCAL_LAUNCHER, cell_overrides, grid_arguments

log = logging.getLogger(__name__)

RERUN_MODES = ("failed", "all")  # failed: skip cells with an ok result (the default); all: run every cell
SLURM_LAUNCHER = "hydra_plugins.prunebench_launcher.SlurmLauncher"
LOCK_FILE = ".prunebench.lock"
MIN_FREE_BYTES = 1 << 20  # less than this where the results go: Hydra's own files already fail to write


@dataclass
class Cell:
    overrides: list[str]
    config: DictConfig  # as composed: the task config, with the `hydra` node when composed by Hydra
    resolved: dict  # the resolved task config, as run.py sees it
    config_hash: str
    run: RunConfig  # as validated, for the checks that read the typed config


def rerun_mode(cfg: DictConfig) -> str:
    mode = cfg.get("rerun", "failed")
    if mode not in RERUN_MODES:
        raise ConfigError(f"rerun={mode!r} is not valid; allowed: {', '.join(RERUN_MODES)}")
    return mode


def sweep_arguments(config: DictConfig) -> list[str]:
    """The sweep's overrides (`bench.grid.grid_arguments`) of a config composed with its `hydra` node."""
    return grid_arguments(OmegaConf.select(config, "hydra.sweeper.params"), config.hydra.overrides.task)


def expand(task_overrides: list[str], compose: Callable[[list[str]], DictConfig]) -> list[Cell]:
    """Every cell of the sweep, each composed by `compose(overrides)` and validated (a ConfigError names
    the cell), with the config hash its run will have."""
    cells = []
    for overrides in cell_overrides(task_overrides):
        config = compose(overrides)
        resolved = task_container(config)
        try:
            task = OmegaConf.create(resolved)
            run_cfg = validate(task)
            rerun_mode(task)
        except ConfigError as exc:
            raise ConfigError(f"cell [{' '.join(overrides)}]: {exc}") from None
        cells.append(Cell(overrides, config, resolved, identity.config_hash(run_cfg.recorded(resolved)), run_cfg))
    return cells


def task_container(config: DictConfig) -> dict:
    """The resolved task config, as the task function sees it (Hydra strips the `hydra` node)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]),
                                  resolve=True)


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.lock: int | None = None  # the open lock file of the sweep dir, while the sweep runs

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        loader = GlobalHydra.instance().config_loader()
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            _refuse_a_file_on_the_path(sweep_dir)
            cells = expand(sweep_arguments(config), lambda o: loader.load_sweep_config(config, o))
            _reuse_composed(loader, config, cells)
            slurm = config.hydra.launcher.get("_target_") == SLURM_LAUNCHER
            printed, refusals = plan.sweep_plan([
                (" ".join(o for o in c.overrides if not o.startswith("plan=")), c.run,
                 OmegaConf.to_container(c.config.hydra.launcher, resolve=True) if slurm else None) for c in cells])
            if plan.plan_mode(config.get("plan", False)):
                print(printed)
                raise SystemExit(0)
            if refusals:
                raise ConfigError(f"{refusals[0]} ({len(refusals)} cell(s) cannot fit; plan=true prints the plan)")
            _pace_local_launcher(config)
            _check_launcher(config)
            _probe_llm_endpoints(cells)
            for model in {(c.run.model.id, c.run.model.path, c.run.model.source): c.run.model for c in cells}.values():
                models.check_reachable(model)  # each distinct model once
            try:
                check_output_dir(sweep_dir, "hydra.sweep.dir")
                self.lock = lock_sweep_dir(sweep_dir)
                merge_manifest(sweep_dir, [{"overrides": c.overrides, "config_hash": c.config_hash} for c in cells])
            except OSError as exc:  # a read-only dir (resuming an archived sweep), a full disk
                raise ConfigError(f"hydra.sweep.dir={sweep_dir} cannot be written ({_why(exc)}); pass a "
                                  f"writable folder") from None
        except ConfigError as exc:
            raise SystemExit(f"prunebench: sweep not started: {exc}") from None

        done = {r.config_hash for r in records.read_results(sweep_dir).records if r.ok}
        already = sum(c.config_hash in done for c in cells)
        if already and rerun_mode(config) != "all":
            log.info("%d of %d cells already have an ok result in %s; they will be skipped (+rerun=all "
                     "runs them again)", already, len(cells), sweep_dir)
        log.info("sweep of %d cells validated", len(cells))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run's dir, before Hydra makes it and writes its own files there (their traceback would
        be the only word on a full disk or a read-only folder)."""
        run_dir = Path(str(config.hydra.run.dir))
        try:
            check_output_dir(run_dir, "hydra.run.dir")
        except OSError as exc:
            raise SystemExit(f"prunebench: config error: hydra.run.dir={run_dir} cannot be written ({_why(exc)}); "
                             f"pass a writable folder") from None
        except ConfigError as exc:
            raise SystemExit(f"prunebench: config error: {exc}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        vars(GlobalHydra.instance().config_loader()).pop("load_sweep_config", None)  # `_reuse_composed`'s
        if self.lock is not None:
            os.close(self.lock)  # releases the flock
            self.lock = None


def _reuse_composed(loader: Any, master: DictConfig, cells: list[Cell]) -> None:
    """Hydra composes each cell again in this process after the validation did, twice: its sweeper checks
    every batch, then the launcher (basic, local) runs it. A compose is ~0.1 s of Hydra's defaults lists, a
    copy ~0.02 s: for the rest of the sweep, the loader answers those from the validated configs, a copy
    each (the launcher writes the cell's job number into it)."""
    composed = {tuple(cell.overrides): cell.config for cell in cells}
    compose = loader.load_sweep_config

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        config = composed.get(tuple(sweep_overrides)) if master_config is master else None
        return copy.deepcopy(config) if config is not None else compose(master_config, sweep_overrides)

    loader.load_sweep_config = load_sweep_config


def _refuse_a_file_on_the_path(where: Path, key: str = "hydra.sweep.dir") -> None:
    """A sweep or run dir (`key`) that cannot be a folder because it or a parent is a file: checked before
    the cells are validated, since Hydra reports an error raised by a callback as a warning and goes on to
    its own mkdir, whose traceback would be the only word."""
    for path in (where, *where.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"{key}={where} cannot be a folder: {path} is a file; pass a folder, or a path "
                                  f"that does not exist yet")
            return


def check_output_dir(where: Path, key: str) -> None:
    """`where` made (if missing) and writable, with room for more than Hydra's own files; an OSError says why
    not. Root writes past read-only permissions, so a read-only mount is read from the mount's flags."""
    _refuse_a_file_on_the_path(where, key)
    where.mkdir(parents=True, exist_ok=True)
    if os.statvfs(where).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(where))
    if not os.access(where, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(where))
    free = shutil.disk_usage(where).free
    if free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}, {free} bytes free", str(where))


def _why(exc: OSError) -> str:
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)


def _probe_llm_endpoints(cells: list[Cell]) -> None:
    """Each HTTP LLM a search of the sweep would call, probed once before any cell runs: a missing key
    variable or an unreachable server stops the sweep in one line, instead of failing every cell after its
    model has loaded. (A local LLM's chat template is checked by its cell, before any pruning.)"""
    probed = []  # LLMConfig is a plain (unhashable) dataclass
    for cell in cells:
        options = cell.run.method.allocator_options
        chat = getattr(options, "llm", None)
        if chat is None or chat.backend != "http" or chat.replay or chat in probed:
            continue
        probed.append(chat)
        try:
            llm.make_backend(chat)
        except ConfigError as exc:
            raise ConfigError(f"cell [{' '.join(cell.overrides)}]: {exc}") from None


def lock_sweep_dir(sweep_dir: Path) -> int:
    """An exclusive lock on the sweep dir, held while the returned descriptor is open (the kernel drops
    it when the process dies, so a killed sweep leaves no stale lock)."""
    handle = os.open(sweep_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(handle)
        raise ConfigError(f"hydra.sweep.dir={str(sweep_dir)!r} is in use by another sweep ({holder}); "
                          f"allowed: a dir no running sweep uses") from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"pid {os.getpid()}".encode(), 0)
    return handle


def merge_manifest(sweep_dir: Path, cells: list[dict]) -> None:
    """cells.json with this sweep's cells first, then those of earlier sweeps into the same dir; an
    unreadable cells.json is kept aside (`cells.json.corrupt`), not overwritten."""
    try:
        earlier = records.read_manifest(sweep_dir) or []
    except CorruptResult as exc:
        log.warning("%s; keeping it as %s.corrupt and writing a new one", exc, records.CELLS_FILE)
        os.replace(sweep_dir / records.CELLS_FILE, sweep_dir / f"{records.CELLS_FILE}.corrupt")
        earlier = []
    hashes = {cell["config_hash"] for cell in cells}
    records.write_manifest(sweep_dir, cells + [cell for cell in earlier if cell["config_hash"] not in hashes])


def _pace_local_launcher(config: DictConfig) -> None:
    if config.hydra.launcher.get("_target_") == LOCAL_LAUNCHER and config.hydra.sweeper.get("max_batch_size") is None:
        with open_dict(config.hydra.sweeper):
            config.hydra.sweeper.max_batch_size = 1


def _check_launcher(config: DictConfig) -> None:
    launcher = config.hydra.launcher
    _printable("hydra.launcher", OmegaConf.to_container(launcher, resolve=True))
    if launcher.get("_target_") != SLURM_LAUNCHER:
        return
    if shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm but `sbatch` is not on PATH; run from a Slurm login node, "
                          "or use hydra/launcher=local")
    if launcher.get("partition") is None:
        partitions = slurm_partitions()
        if partitions is not None and not any(default for _, default in partitions):
            names = ", ".join(name for name, _ in partitions) or "(none listed)"
            raise ConfigError(f"hydra.launcher.partition=null but this cluster has no default partition; "
                              f"allowed: {names}")


def _printable(key: str, value: Any) -> None:
    """No control character (a newline ends an #SBATCH line and starts a shell line) in any launcher value."""
    if isinstance(value, dict):
        for name, item in value.items():
            _printable(f"{key}.{name}", str(name))
            _printable(f"{key}.{name}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _printable(f"{key}[{index}]", item)
    elif isinstance(value, str) and not value.isprintable():
        raise ConfigError(f"{key}={value!r} holds a control character (newline, tab, ...); allowed: printable text")


def slurm_partitions() -> list[tuple[str, bool]] | None:
    """[(partition, is_default)] from `sinfo`, or None when sinfo cannot tell."""
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    names = sorted({line.strip() for line in proc.stdout.splitlines() if line.strip()})
    return [(name.rstrip("*"), name.endswith("*")) for name in names]
