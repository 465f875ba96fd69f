"""prunebench entry point: compose the config, validate it once, run one cell, write its result.

    python run.py                                         # one cell with the defaults
    python run.py -m method=dense,sparsegpt,wanda sparsity=0.5,0.7   # a sweep (cross product)
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench.compose import app_help, eval_sweep, keys_of_swept_groups, unknown_key
from bench.core.vocab import ConfigError

log = logging.getLogger("prunebench")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Imported here, not above: `--help` and `--cfg job` never call main, and the harness pulls in torch
    # and transformers (seconds) that those answers do not need. The packages themselves keep every
    # import of ours at module level (tests/test_layers.py); this script is their only lazy entry.
    from bench import models, plan
    from bench.cell import run_cell
    from bench.config import ConfigError, validate
    from bench.isolate import run_isolated
    from bench.sweep import rerun_mode

    hydra_cfg = HydraConfig.get()
    try:
        run_cfg = validate(cfg)
        rerun = rerun_mode(cfg)
        if plan.plan_mode(cfg.get("plan", False)):  # a sweep's plan is printed by its callback, before any cell
            print(plan.sweep_plan([("cell", run_cfg, None)])[0])
            return
        if hydra_cfg.mode != RunMode.MULTIRUN:  # a sweep's callback checked each distinct model once
            models.check_reachable(run_cfg.model)
    except ConfigError as exc:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the sweep's validation callback already checked every cell; this is a bug
        print(f"prunebench: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    out_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    result = run_isolated(out_dir, run_cell, run_cfg, resolved, out_dir, sweep_dir, rerun,
                          bool(cfg.get("cache", True)))
    if not result.ok and hydra_cfg.mode != RunMode.MULTIRUN:
        print(f"prunebench: cell failed: {result.error.type}: {result.error.message}", file=sys.stderr)
        sys.exit(1)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        # pandas and matplotlib: only a single run prints its own table; a sweep's is its callback's
        from reports.collect import collect

        # the cell's own dir: `<dir>.1` where the asked one already holds a result it must not overwrite
        print(collect(Path(result.path).parent).markdown)
        # a timestamped dir under outputs/ (or that `<dir>.1`) is not where one looks
        print(f"prunebench: result in {result.path}")
        if result.saved_to:
            print(f"prunebench: checkpoint in {result.saved_to}")


def _help(arguments: list[str]) -> str | None:
    """Our --help text, where Hydra's would be the same (plain overrides, our help template), else None."""
    flags = [a for a in arguments if a.startswith("-")]
    overrides = [a for a in arguments if a not in flags]
    if flags not in (["--help"], ["-h"]) or any("=" not in a or a.lstrip("+~").startswith("hydra") for a in overrides):
        return None  # Hydra's own flags and settings (hydra/help=, hydra.job.name=) are Hydra's
    try:
        return app_help(overrides)
    except ConfigError:
        return None  # Hydra says what is wrong with the override


if __name__ == "__main__":
    if (text := _help(sys.argv[1:])) is not None:
        print(text)
        sys.exit(0)
    # before Hydra: its hint for an unknown key is to add `+key=`, and it sweeps `eval=ppl,zeroshot` silently
    sys.argv[1:] = keys_of_swept_groups(sys.argv[1:])
    if (error := eval_sweep(sys.argv[1:]) or unknown_key(sys.argv[1:])) is not None:
        sys.exit(f"prunebench: config error: {error}")
    main()
