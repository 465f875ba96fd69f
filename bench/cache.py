"""On-disk cache of what the cells of a sweep share, keyed by exactly what it depends on, code included.

Cached (each entry keyed by a hash of its inputs and of the code that computes it):
- token ids of a corpus: model identity (its tokenizer) + sha256 of the text;
- the inputs of block 0 and the kwargs every block gets: model identity + the calibration samples;
- the perplexity of the *dense* model: model identity + the evaluation token windows;
- the dense-model observations of the components that make a dense pass (OWL outlier ratios, loss
  estimates, CFSP block and channel scores; `dense_state()` of `methods.base.Component`): model
  identity + calibration samples + allocator and pruner names and options + statistics level;
- the rates and record of a search (Self-Pruner and its GA/random arms): model identity + calibration
  samples + target + what the allocator says its search depends on (`Allocator.search_identity`: its
  options and its *fitness* pruner, not the cell's), so the Wanda and SparseGPT cells of a search arm
  that scores candidates with Wanda run one search, and the second cell's record says `cache.hits: search`.
Not cached: anything computed after a block was pruned by the cell's pruner (sequential pruners calibrate
block k on the outputs of the already-pruned blocks 0..k-1, so those statistics differ between cells).
Every key but the tokens' carries the number of torch threads: it changes the order of reductions, so
the last bits of what is computed (which is why `threads` is part of a cell's identity).

Code: every key carries a fingerprint of the modules that compute that kind of value (`STAGE_MODULES`,
plus the observing components' own modules), the prunebench version, and the torch and transformers
versions, so after a fix an old value is never served: it is simply not found, and recomputed.
Model identity is the resolved model config without `resources`, plus the size and mtime of a local
checkpoint's files. Entries live under `$PRUNEBENCH_CACHE/cells/<kind>/<key>.safetensors` (default
~/.cache/prunebench), written atomically, so concurrent cells at worst compute the same entry twice.
Disable with `cache=false`.

Files, not programs: an entry is a safetensors file (tensors, numpy arrays stored as tensors) whose
metadata holds the rest of the value as JSON (numbers, strings, lists, tuples, dicts) and the key it was
written for. Reading one runs no code (nothing is unpickled); an entry that does not parse, or was
written for another key, is recomputed and overwritten. A cache that cannot be written (full disk, no
permission) costs the cell its reuse, not its result: a warning goes into the result.

    python -m bench.cache list [--kind K]     # entries, sizes and ages per kind
    python -m bench.cache clear [--kind K]    # delete them
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import importlib
import json
import logging
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from bench.config import ModelConfig
from bench.core import records
from bench.models import cache_dir
from methods.catalog import MethodSpec
from methods.registry import ALLOCATORS, PRUNERS

log = logging.getLogger(__name__)

KINDS = ("tokens", "block0", "dense_ppl", "dense_state", "search")
# The modules whose code decides each kind of value; a change to any of them changes the key.
STAGE_MODULES = {
    "tokens": ("bench.data", "bench.models", "bench.tokenization"),
    "block0": ("bench.core.engine", "bench.core.families", "bench.models"),
    "dense_ppl": ("bench.core.perplexity", "bench.data", "bench.models", "bench.tokenization"),
    "dense_state": ("bench.core.engine", "bench.core.families", "bench.models", "methods.base", "methods.lifecycle"),
    # besides the allocator's own modules (`search_identity`); bench.llm loads the search's LLM
    "search": ("bench.core.engine", "bench.core.families", "bench.core.perplexity", "bench.llm", "bench.models",
               "methods.base", "methods.lifecycle"),
}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tensor_digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous().cpu()
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(header + tensor.view(torch.uint8).numpy().tobytes()).hexdigest()[:24]


def _source(module: str) -> bytes:
    return Path(importlib.import_module(module).__file__).read_bytes()


def code_fingerprint(modules: Iterable[str]) -> str:
    """Hash of the prunebench, torch and transformers versions and of the source of `modules`."""
    digest = hashlib.sha256(f"{metadata.version('prunebench')} {torch.__version__} "
                            f"{transformers.__version__}".encode())
    for module in sorted(set(modules)):
        digest.update(module.encode() + b"\0" + _source(module))
    return digest.hexdigest()[:16]


def model_identity(cfg: ModelConfig) -> dict:
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resources"}
    if cfg.path is not None:  # a local checkpoint can be rewritten in place: key on its files too
        root = Path(cfg.path).expanduser()
        identity["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir()
                                   if p.is_file())
    return identity


SUFFIX = ".safetensors"


class Uncacheable(TypeError):
    """A value holding something other than tensors, arrays, numbers, strings and containers of them."""


def encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, its tensors and arrays moved into `tensors` (named by position) and referenced."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        kind = "tensor" if isinstance(value, torch.Tensor) else "ndarray"
        tensor = value.detach().cpu() if kind == "tensor" else torch.from_numpy(np.ascontiguousarray(value))
        name = str(len(tensors))
        tensors[name] = tensor.contiguous().clone()  # safetensors refuses views sharing storage
        return {kind: name}
    if isinstance(value, np.generic):
        return encode(value.item(), tensors)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [encode(item, tensors) for item in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}
    raise Uncacheable(f"cannot cache a {type(value).__name__}")


def decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`; a node of any other shape is a foreign file (ValueError/KeyError)."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    (kind, body), = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "ndarray":
        return tensors[body].numpy()
    if kind == "float":
        return float(body)
    if kind in ("list", "tuple"):
        items = [decode(item, tensors) for item in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {decode(k, tensors): decode(v, tensors) for k, v in body}
    raise ValueError(f"unknown node {kind!r}")


def read_entry(path: Path, key_digest: str) -> Any:
    """The value stored in `path` for `key_digest`; any exception means: not a valid entry for it."""
    with safe_open(str(path), framework="pt") as entry:
        metadata = entry.metadata() or {}
        if metadata.get("key") != key_digest:
            raise ValueError(f"written for key {metadata.get('key')!r}, not {key_digest!r}")
        tensors = {name: entry.get_tensor(name) for name in entry.keys()}
    return decode(json.loads(metadata["value"]), tensors)


def write_entry(path: Path, key_digest: str, value: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(encode(value, tensors), allow_nan=False)
    records.write_atomic(path, lambda staging: save_file(tensors, str(staging),
                                                        metadata={"key": key_digest, "value": structure}))


class DiskCache:
    """`root=None`: caching off, every value is computed."""

    def __init__(self, root: Optional[Path]):
        self.root = None if root is None else Path(root)
        self.hits: list[str] = []
        self.misses: list[str] = []
        self.warnings: list[str] = []

    def get_or_compute(self, kind: str, key: Any, code: Iterable[str], compute: Callable[[], Any]) -> Any:
        """The value of `key`, computed by the code in the modules `code`."""
        if self.root is None:
            return compute()
        digest = _digest([key, code_fingerprint(code)])
        path = self.root / kind / f"{digest}{SUFFIX}"
        if path.exists():
            try:
                value = read_entry(path, digest)
                self.hits.append(kind)
                return value
            except Exception as exc:  # truncated, tampered or foreign: never trusted, recomputed
                log.warning("cache entry %s is not valid (%s: %s); recomputing", path, type(exc).__name__, exc)
        value = compute()
        try:
            write_entry(path, digest, value)
        except (OSError, Uncacheable) as exc:
            why = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
            message = f"cache: {kind} not stored ({why}: {exc}); computed without the cache"
            log.warning(message)
            self.warnings.append(message)
        self.misses.append(kind)
        return value


class CellCache:
    """The cache as one cell sees it: bound to its model and method; the engine asks it for block-0
    inputs and dense observations of the calibration samples it was given."""

    def __init__(self, disk: DiskCache, model: ModelConfig, method: Optional[MethodSpec] = None):
        self.disk = disk
        self.model = model_identity(model)
        self.method = None if method is None else [method.allocator, _asdict(method.allocator_options),
                                                   method.pruner, _asdict(method.pruner_options)]
        self.components = () if method is None else (ALLOCATORS[method.allocator].__module__,
                                                      PRUNERS[method.pruner].__module__)

    def tokens(self, text: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = [self.model, hashlib.sha256(text.encode()).hexdigest()]
        return self.disk.get_or_compute("tokens", key, STAGE_MODULES["tokens"], compute)

    def dense_ppl(self, windows: torch.Tensor, device: str, compute: Callable[[], float]) -> float:
        key = [self.model, tensor_digest(windows), device, torch.get_num_threads()]
        return self.disk.get_or_compute("dense_ppl", key, STAGE_MODULES["dense_ppl"], compute)

    def block0(self, samples: torch.Tensor, device: str, batch: int, compute: Callable[[], tuple]) -> tuple:
        # kwargs are captured per batch size
        key = [self.model, tensor_digest(samples), device, batch, torch.get_num_threads()]
        return self.disk.get_or_compute("block0", key, STAGE_MODULES["block0"], compute)

    def dense_state(self, samples: torch.Tensor, stats_level: str, batch: int, compute: Callable[[], Any]) -> Any:
        # the batch changes the order of the statistics' sums, so the last bits of what is observed
        key = [self.model, tensor_digest(samples), self.method, stats_level, batch, torch.get_num_threads()]
        code = STAGE_MODULES["dense_state"] + self.components
        return self.disk.get_or_compute("dense_state", key, code, compute)

    def search(self, samples: torch.Tensor, target: float, device: str, batch: int, identity: dict,
               modules: Iterable[str], compute: Callable[[], tuple]) -> tuple:
        """(rates, record) of a search; `identity` and `modules` from `Allocator.search_identity`."""
        key = [self.model, tensor_digest(samples), target, device, batch, torch.get_num_threads(), identity]
        code = STAGE_MODULES["search"] + tuple(modules)
        return self.disk.get_or_compute("search", key, code, compute)

    @property
    def report(self) -> dict:
        return {"hits": sorted(self.disk.hits), "misses": sorted(self.disk.misses)}

    @property
    def warnings(self) -> list[str]:
        return list(self.disk.warnings)


def _asdict(options: Any) -> Any:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else repr(options)


def cells_dir() -> Path:
    return cache_dir() / "cells"


def for_cell(enabled: bool, model: ModelConfig, method: Optional[MethodSpec], root: Optional[Path] = None) -> CellCache:
    """The cache of a cell; with `enabled=False` it computes everything."""
    return CellCache(DiskCache((root or cells_dir()) if enabled else None), model, method)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description="list or clear the cross-cell cache")
    parser.add_argument("command", choices=("list", "clear"))
    parser.add_argument("--kind", choices=KINDS, help="only this kind of entry")
    args = parser.parse_args(argv)
    root = cells_dir()
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        entries = sorted((root / kind).glob(f"*{SUFFIX}")) if (root / kind).is_dir() else []
        size = sum(p.stat().st_size for p in entries)
        if args.command == "clear":
            if (root / kind).is_symlink():  # what it points to is not ours to empty
                print(f"{kind}: {root / kind} is a symlink; nothing under it removed")
                continue
            # our entries and the staging files of interrupted writes, never a user's file that sits there
            staged = (root / kind).glob(f".*{SUFFIX}.*.tmp")
            ours = [p for p in [*entries, *staged] if p.is_file() and not p.is_symlink()]
            for path in ours:
                path.unlink()
            if (root / kind).is_dir() and not any((root / kind).iterdir()):
                (root / kind).rmdir()
            print(f"{kind}: removed {sum(p in ours for p in entries)} entries ({size / 2**20:.1f} MiB)")
            continue
        newest = max((p.stat().st_mtime for p in entries), default=None)
        age = "-" if newest is None else f"newest {(time.time() - newest) / 3600:.1f} h ago"
        print(f"{kind}: {len(entries)} entries, {size / 2**20:.1f} MiB, {age}")
    print(f"(cache dir: {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
