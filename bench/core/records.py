"""The result record: one `result.json` per cell, its schema, its one writer and its one reader, and the
registry that says what every metric means.

The harness writes records (`write_result`); tables, plots, W&B, status and verdicts read them
(`read_results`) and look metrics up in `METRICS` instead of guessing from names. Files are written
atomically (staging file + rename), so a reader never sees half a record. A file that is not a record
(truncated, foreign JSON, a newer schema) is reported by the reader as corrupt, never dropped silently
and never mistaken for a result.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# 3: CellKey.display; 2: typed record; 1 (first build) had the same fields as 2. Older ones are read as 3.
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)
RESULT_FILE = "result.json"
CELLS_FILE = "cells.json"
PROGRESS_FILE = "progress.json"  # beside a running cell's result.json: its current stage (bench.progress)
STATUSES = ("running", "ok", "failed", "interrupted")


# --- metrics -------------------------------------------------------------------------------------

# Config keys added after results existed, with the value that reproduces those results. At that value a
# key is dropped from a config's identity (its hash, its table row), so an earlier record, which lacks the
# key, stays the same cell: a resumed sweep does not re-run it and a table does not split its row.
LATER_KEYS = {("data", "calib", "batch"): 1}


def without_later_defaults(config: dict) -> dict:
    """`config` without each of `LATER_KEYS` that holds its default (copied along the path, `config` unchanged)."""
    for path, default in LATER_KEYS.items():
        config = _without(config, path, default)
    return config


def _without(tree: dict, path: tuple, default) -> dict:
    head, *rest = path
    if not isinstance(tree, dict) or head not in tree:
        return tree
    if rest:
        return {**tree, head: _without(tree[head], tuple(rest), default)}
    return {k: v for k, v in tree.items() if k != head or v != default}


@dataclass(frozen=True)
class Metric:
    """A metric family: `name` or `name/<argument>` (a dataset, a task, a stage) in targets and tables."""

    name: str
    direction: str  # "lower" or "higher" is better
    unit: str  # "" (a plain number), "%", "pp" (percentage points) or "x" (a ratio)
    label: str  # column label; {arg} is the argument after the slash
    decimals: int
    read: Callable[[dict, str], Optional[float]]  # (record metrics, argument) -> value in display units
    default_arg: str = ""

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower"

    def format(self, value: float) -> str:
        return f"{value:.{self.decimals}f}" + ("x" if self.unit == "x" else "")


def _ppl(metrics: dict, dataset: str) -> Optional[float]:
    return metrics.get("ppl", {}).get(dataset)


def _accuracy(kind: str) -> Callable[[dict, str], Optional[float]]:
    def read(metrics: dict, task: str) -> Optional[float]:
        scores = metrics.get("zeroshot", {}).get("tasks", {}).get(task)
        value = None if scores is None else scores["value" if kind == "acc" else "acc_norm"]
        return None if value is None else 100 * value
    return read


def _acc_avg(metrics: dict, _: str) -> Optional[float]:
    zeroshot = metrics.get("zeroshot", {})
    return None if "average" not in zeroshot else 100 * zeroshot["average"]


def _speedup(metrics: dict, stage: str) -> Optional[float]:
    return metrics.get("speed", {}).get(f"{stage}_speedup")


def _across_records(metrics: dict, _: str) -> None:
    """A metric no single record holds: it compares two (see `accuracy_drop`)."""
    return None


METRICS = {m.name: m for m in (
    Metric("ppl", "lower", "", "{arg} ppl", 2, _ppl),
    Metric("acc", "higher", "%", "{arg} acc", 1, _accuracy("acc")),  # the task's configured acc or acc_norm
    Metric("acc_norm", "higher", "%", "{arg} acc_norm", 1, _accuracy("acc_norm")),
    Metric("acc_avg", "higher", "%", "avg acc", 1, _acc_avg),
    Metric("speedup", "higher", "x", "{arg} speed-up", 2, _speedup, default_arg="prefill"),
    # percentage points of acc_avg lost against the dense cell of the same sweep and protocol
    Metric("acc_avg_drop", "lower", "pp", "avg acc drop", 2, _across_records),
)}
NEEDS_DENSE = ("acc_avg_drop",)  # metrics computed from a record and the dense record beside it


def accuracy_drop(result: "Result", dense: "Result") -> Optional[float]:
    """`acc_avg_drop` of `result`: the dense cell's average zero-shot accuracy minus the result's, in
    percentage points (positive: pruning lost accuracy); None when either has no zero-shot average."""
    ours, baseline = result.value("acc_avg"), dense.value("acc_avg")
    return None if ours is None or baseline is None else baseline - ours


def metric(name: str) -> Metric:
    """The registry entry of `ppl/wikitext2`, `acc/boolq`, `acc_avg`, `speedup/decode`, ..."""
    family = name.partition("/")[0]
    if family not in METRICS:
        raise KeyError(f"metric {name!r} is not known; allowed: "
                       f"{', '.join(m.name + ('' if m.name in ('acc_avg', 'acc_avg_drop') else '/<arg>') for m in METRICS.values())}")
    return METRICS[family]


# --- the record ----------------------------------------------------------------------------------

@dataclass
class CellKey:
    """What a table row and column are made of."""

    model: str
    method: str
    sparsity: float
    sparsity_type: str = "unstructured"
    protocol: str = ""
    seed: int = 0
    wbits: Optional[int] = None
    display: Optional[str] = None  # the method's display name (`method.display`); None in records before schema 3


@dataclass
class Failure:
    type: str
    message: str
    traceback: Optional[str] = None


@dataclass
class Result:
    status: str  # one of STATUSES
    config_hash: str
    cell: CellKey
    config: dict = field(default_factory=dict)  # the resolved config the cell ran
    provenance: dict = field(default_factory=dict)  # versions, git, platform, argv
    timings: dict = field(default_factory=dict)  # stage -> seconds
    warnings: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # {"ppl": {dataset: v}, "zeroshot": {...}, "speed": {...}}
    error: Optional[Failure] = None
    process: dict = field(default_factory=dict)  # host, pid, Slurm job, start time
    data: dict = field(default_factory=dict)  # the corpora actually used
    protocol: dict = field(default_factory=dict)  # {"id": short hash, "fields": what papers disagree on}
    sparsity: dict = field(default_factory=dict)  # target, measured, allocated, per layer / per block
    allocator: dict = field(default_factory=dict)  # the allocator's own record (searches)
    recovery: Optional[dict] = None
    saved_to: Optional[str] = None
    cache: dict = field(default_factory=dict)  # cross-cell cache hits and misses
    peak_memory: dict = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    path: Optional[str] = None  # where it was read from; not written

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, name: str) -> Optional[float]:
        """The value of metric `name` (see `METRICS`) in display units, or None when not measured."""
        entry = metric(name)
        arg = name.partition("/")[2] or entry.default_arg
        return entry.read(self.metrics, arg)

    def metric_values(self) -> dict[str, float]:
        """Every measured metric under its registry name (`ppl/wikitext2`, `acc/boolq`, `acc_avg`,
        `speedup/prefill`, ...), in display units."""
        zeroshot = self.metrics.get("zeroshot", {})
        names = [f"ppl/{dataset}" for dataset in self.metrics.get("ppl", {})]
        names += [f"acc/{task}" for task in zeroshot.get("tasks", {})] + (["acc_avg"] if "average" in zeroshot else [])
        names += [f"speedup/{stage}" for stage in ("prefill", "decode")
                  if f"{stage}_speedup" in self.metrics.get("speed", {})]
        return {name: self.value(name) for name in names}

    def to_dict(self) -> dict:
        payload = dataclasses.asdict(self)
        payload.pop("path")
        return payload

    @staticmethod
    def from_dict(payload: Any) -> "Result":
        """The record in `payload`, or CorruptResult saying what is wrong with it."""
        if not isinstance(payload, dict):
            raise CorruptResult(f"not a JSON object but {type(payload).__name__}")
        if payload.get("schema") not in READABLE_SCHEMAS:
            raise CorruptResult(f"schema {payload.get('schema')!r}; this version reads {READABLE_SCHEMAS}")
        missing = [k for k in ("status", "config_hash", "cell", "metrics") if k not in payload]
        if missing:
            raise CorruptResult(f"no {', '.join(missing)}")
        if payload["status"] not in STATUSES:
            raise CorruptResult(f"status {payload['status']!r}; allowed: {', '.join(STATUSES)}")
        if not isinstance(payload["cell"], dict) or not isinstance(payload["metrics"], dict):
            raise CorruptResult("cell and metrics must be objects")
        if not all(isinstance(v, dict) for v in payload["metrics"].values()):
            raise CorruptResult("every metric family (ppl, zeroshot, speed) must be an object")
        known = {f.name for f in dataclasses.fields(Result)} - {"path"}
        try:
            values = {k: v for k, v in payload.items() if k in known}
            values["cell"] = CellKey(**payload["cell"])
            values["error"] = None if payload.get("error") is None else Failure(**payload["error"])
            values["schema"] = SCHEMA_VERSION
            return Result(**values)
        except TypeError as exc:
            raise CorruptResult(str(exc)) from None


class CorruptResult(ValueError):
    """A result file that cannot be read as a record."""


# --- writing and reading -------------------------------------------------------------------------

def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: strict JSON has no NaN, and a reader
    must not mistake one for a number (the cell fails on a non-finite metric before writing it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    """Strict JSON (no NaN/Infinity: see `finite`), written to a staging file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(finite(payload), out, indent=2, sort_keys=False, default=str, allow_nan=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_result(directory: Path, result: Result) -> Path:
    path = Path(directory) / RESULT_FILE
    write_json_atomic(path, result.to_dict())
    return path


def read_result(path: Path) -> Result:
    """The record in `path`; CorruptResult when it is unreadable or not a record."""
    try:
        payload = json.loads(Path(path).read_text(), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptResult(f"{type(exc).__name__}: {exc}") from None
    result = Result.from_dict(payload)
    result.path = str(path)
    return result


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not strict JSON")


@dataclass
class Results:
    """Every record under a dir, and the files that looked like records but were not."""

    records: list[Result]
    corrupt: list[tuple[str, str]]  # (path, why)


def read_results(root: Path) -> Results:
    records, corrupt = [], []
    for path in sorted(Path(root).rglob(RESULT_FILE)):
        try:
            records.append(read_result(path))
        except CorruptResult as exc:
            corrupt.append((str(path), str(exc)))
    return Results(records, corrupt)


def write_manifest(sweep_dir: Path, cells: list[dict]) -> None:
    """`cells.json`: the overrides and config hash of every cell of a sweep, written when it starts."""
    write_json_atomic(Path(sweep_dir) / CELLS_FILE, {"cells": cells})


def read_manifest(sweep_dir: Path) -> Optional[list[dict]]:
    """The cells of `cells.json`, None when there is none; CorruptResult when it is not a manifest."""
    path = Path(sweep_dir) / CELLS_FILE
    if not path.exists():
        return None
    try:
        cells = json.loads(path.read_text())["cells"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise CorruptResult(f"{path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("config_hash"), str)
                                              and isinstance(c.get("overrides"), list) for c in cells):
        raise CorruptResult(f"{path}: not a list of cells with overrides and config_hash")
    return cells
