"""The Python entry point, for notebooks and scripts: one cell, as `python run.py <overrides>` runs it.

    import prunebench
    result = prunebench.run(["model=llama-tiny", "method=wanda", "sparsity=0.5"])
    result.metrics["ppl"], result.sparsity["measured"], result.path
    model, tokenizer = prunebench.load(result)   # the pruned model, when the cell ran with save_dir=<dir>

It returns the cell's typed record (`bench.core.records.Result`, the `result.json` every table reads);
`save_dir=<dir>` among the overrides also writes the pruned checkpoint there, loadable with plain
transformers, or by `load(result)`. A bad key or value raises `ConfigError` with the same one line the
CLI prints; a failed cell is returned with `status == "failed"` and its error, as in a sweep.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from bench import models
from bench.cell import run_cell
from bench.compose import compose
from bench.config import ConfigError, ModelConfig, validate
from bench.core.records import Result
from bench.sweep import rerun_mode

__all__ = ["run", "load", "Result", "ConfigError"]


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


def load(result: Result) -> tuple:
    """(model, tokenizer) of the pruned checkpoint a cell wrote (`save_dir=<dir>` among its overrides), in
    the cell's dtype, on the CPU in eval mode: the pruned model as the cell evaluated it."""
    if result.saved_to is None:
        raise ConfigError(f"{result.path or 'this result'}: the cell saved no checkpoint; run it with save_dir=<dir>"
                          f" among the overrides to load its pruned model")
    dtype = (result.config.get("model") or {}).get("dtype", "float32")
    return models.load(ModelConfig(name=result.cell.model, source="hub", path=result.saved_to, dtype=dtype))
