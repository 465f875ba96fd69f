"""On-disk cache of what the cells of a sweep share, keyed by exactly what it depends on.

Cached (each entry keyed by a hash of its inputs, plus the torch/transformers versions):
- token ids of a corpus: model identity (its tokenizer) + sha256 of the text;
- the inputs of block 0 and the kwargs every block gets: model identity + the calibration samples;
- the perplexity of the *dense* model: model identity + the evaluation token windows;
- the dense-model observations of the components that make a dense pass (OWL outlier ratios, loss
  estimates, CFSP block and channel scores): model identity + calibration samples + allocator and pruner
  names and options + stats level. A component opts in by defining `dense_state() -> object` (what
  `observe_block` gathered; torch.save-able) and `load_dense_state(state)`; when every observing
  component does, the engine skips the dense traversal on a hit (`bench.engine.prune`).
Not cached: anything computed after a block was pruned (sequential pruners calibrate block k on the
outputs of the already-pruned blocks 0..k-1, so those statistics differ between cells).

Model identity is the resolved model config without `resources` (name, source, id or local path,
dtype, architecture), plus the size and mtime of a local checkpoint's files. Entries live under
`$PRUNEBENCH_CACHE/cells/<kind>/<key>.pt` (default ~/.cache/prunebench), written atomically, so
concurrent cells at worst compute the same entry twice. Disable with `cache=false`; delete the dir to
clear it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bench.config import ModelConfig

log = logging.getLogger(__name__)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tensor_digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous().cpu()
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(header + tensor.view(torch.uint8).numpy().tobytes()).hexdigest()[:24]


def model_identity(cfg: ModelConfig) -> dict:
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resources"}
    identity["versions"] = {"torch": torch.__version__, "transformers": _transformers_version()}
    if cfg.path is not None:  # a local checkpoint can be rewritten in place: key on its files too
        root = Path(cfg.path).expanduser()
        identity["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir()
                                   if p.is_file())
    return identity


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


class DiskCache:
    """`root=None`: caching off, every value is computed."""

    def __init__(self, root: Optional[Path]):
        self.root = None if root is None else Path(root)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def get_or_compute(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        if self.root is None:
            return compute()
        path = self.root / kind / f"{_digest(key)}.pt"
        if path.exists():
            try:
                value = torch.load(path, weights_only=False)
                self.hits.append(kind)
                return value
            except Exception as exc:  # a truncated or foreign file: recompute and overwrite it
                log.warning("cache entry %s unreadable (%s); recomputing", path, exc)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            torch.save(value, staging)
            os.replace(staging, path)
        finally:
            Path(staging).unlink(missing_ok=True)
        self.misses.append(kind)
        return value


class CellCache:
    """The cache as one cell sees it: bound to its model; the engine asks it for block-0 inputs and
    allocator observations of the calibration samples it was given."""

    def __init__(self, disk: DiskCache, model: ModelConfig, method: Any = None):
        self.disk = disk
        self.model = model_identity(model)
        self.method = None if method is None else [method.allocator, _asdict(method.allocator_options),
                                                   method.pruner, _asdict(method.pruner_options)]

    def tokens(self, text: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.disk.get_or_compute("tokens", [self.model, hashlib.sha256(text.encode()).hexdigest()], compute)

    def dense_ppl(self, windows: torch.Tensor, device: str, compute: Callable[[], float]) -> float:
        return self.disk.get_or_compute("dense_ppl", [self.model, tensor_digest(windows), device], compute)

    def block0(self, samples: torch.Tensor, device: str, compute: Callable[[], tuple]) -> tuple:
        return self.disk.get_or_compute("block0", [self.model, tensor_digest(samples), device], compute)

    def dense_state(self, samples: torch.Tensor, stats_level: str, compute: Callable[[], Any]) -> Any:
        key = [self.model, tensor_digest(samples), self.method, stats_level]
        return self.disk.get_or_compute("dense_state", key, compute)

    @property
    def report(self) -> dict:
        return {"hits": sorted(self.disk.hits), "misses": sorted(self.disk.misses)}


def _asdict(options: Any) -> Any:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else repr(options)


def for_cell(enabled: bool, model: ModelConfig, method: Any, root: Optional[Path] = None) -> CellCache:
    """The cache of a cell (`method`: its MethodSpec); with `enabled=False` it computes everything."""
    from bench.models import cache_dir

    return CellCache(DiskCache((root or cache_dir() / "cells") if enabled else None), model, method)
