"""The Python entry point, for notebooks and scripts: one cell, as `python run.py <overrides>` runs it.

    import prunebench
    result = prunebench.run(["model=llama-tiny", "method=wanda", "sparsity=0.5"])
    result.metrics["ppl"], result.sparsity["measured"], result.path

It returns the cell's typed record (`bench.core.records.Result`, the `result.json` every table reads);
`save_dir=<dir>` among the overrides also writes the pruned checkpoint there, loadable with plain
transformers. A bad key or value raises `ConfigError` with the same one line the CLI prints; a failed
cell is returned with `status == "failed"` and its error, as in a sweep.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from bench import models
from bench.cell import run_cell
from bench.compose import compose
from bench.config import ConfigError, validate
from bench.core.records import Result
from bench.sweep import rerun_mode

__all__ = ["run", "Result", "ConfigError"]


def run(overrides: Sequence[str] = (), out_dir: Optional[Path] = None) -> Result:
    """Run one cell in this process; its files go to `out_dir` (default: where `python run.py` would put
    them, `outputs/<time>_<model>_<method>_<sparsity>`). A cell already done there is returned, not run
    again, unless `rerun=all` is among the overrides."""
    cfg = compose(list(overrides))
    run_cfg = validate(cfg)
    models.check_reachable(run_cfg.model)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if out_dir is None:
        out_dir = Path("outputs") / (f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{cfg.model.name}_{cfg.method.name}_"
                                     f"{cfg.sparsity}")
    return run_cell(run_cfg, resolved, Path(out_dir), rerun=rerun_mode(cfg), cache=bool(cfg.get("cache", True)))
