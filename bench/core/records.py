"""The result record: one `result.json` per cell, its schema, its one writer and its one reader.

The harness writes records (`write_result`); tables, plots, W&B, status and verdicts read them
(`read_results`) and look metrics up in `bench.core.metrics.METRICS` instead of guessing from names.
Files are written atomically (`write_atomic`: staging file + rename), so a reader never sees half a
record. A file that is not a record (truncated, foreign JSON, a newer schema) is reported by the reader
as corrupt, never dropped silently and never mistaken for a result.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from bench.core import identity, metrics as registry

# 4: CellKey.baseline; 3: CellKey.display; 2: typed record; 1 (first build) had the same fields as 2.
# Older ones are read as 4.
SCHEMA_VERSION = 4
READABLE_SCHEMAS = (1, 2, 3, 4)
RESULT_FILE = "result.json"
CELLS_FILE = "cells.json"
PROGRESS_FILE = "progress.json"  # beside a running cell's result.json: its current stage (bench.progress)
STATUSES = ("running", "ok", "failed", "interrupted")


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
    # the dense baseline the other cells are compared with (the method prunes nothing); records before
    # schema 4 lack it: theirs is the method named "dense"
    baseline: bool = False


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
    path: Optional[str] = None  # where it was read from or last written; not itself written

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, name: str, baseline: Optional["Result"] = None) -> Optional[float]:
        """The value of metric `name` (see `bench.core.metrics`) in display units, or None when not
        measured; a metric computed against the baseline needs its `baseline` record."""
        return registry.value(name, self.metrics, None if baseline is None else baseline.metrics)

    def metric_values(self, baseline: Optional["Result"] = None) -> dict[str, float]:
        """Every measured metric under its registry name (`ppl/wikitext2`, `acc/boolq`, `acc_avg`,
        `speedup/prefill`, ...; with the `baseline` record, `acc_avg_drop`), in display units."""
        theirs = None if baseline is None else baseline.metrics
        return {name: registry.value(name, self.metrics, theirs) for name in registry.names(self.metrics, theirs)}

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
        wrong = _wrong_types(CellKey, payload["cell"]) + _wrong_types(Result, payload)
        if wrong:
            raise CorruptResult(f"{', '.join(wrong)} of another type than a record's")
        known = {f.name for f in dataclasses.fields(Result)} - {"path"}
        try:
            values = {k: v for k, v in payload.items() if k in known}
            values["cell"] = CellKey(**{"baseline": payload["cell"].get("method") == "dense", **payload["cell"]})
            values["error"] = None if payload.get("error") is None else Failure(**payload["error"])
            values["schema"] = SCHEMA_VERSION
            result = Result(**values)
        except TypeError as exc:
            raise CorruptResult(str(exc)) from None
        _check_metric_values(result)
        return result


class CorruptResult(ValueError):
    """A result file that cannot be read as a record."""


_JSON_TYPES = {"str": str, "float": (int, float), "int": int, "bool": bool, "dict": dict, "list": list}
NUMBERS = {"timings": None, "sparsity": ("target", "measured", "params_removed")}  # None: every value


def _wrong_types(schema, payload: dict) -> list[str]:
    """The fields of `payload` whose JSON type is not the one `schema` (a record's dataclass) declares, and
    the numbers the reports format that are not numbers: one hand-edited record would otherwise stop
    every report of its sweep (a string sparsity, a null config), not only its own row."""
    wrong = []
    for spec in dataclasses.fields(schema):
        value, declared = payload.get(spec.name), str(spec.type)
        optional = declared.startswith("Optional[")
        kind = _JSON_TYPES.get(declared[9:-1] if optional else declared)
        if spec.name not in payload or kind is None or (value is None and optional):
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
            wrong.append(f"{spec.name}={value!r:.40}")
        elif spec.name in NUMBERS and schema is Result:
            keys = NUMBERS[spec.name] or value
            wrong += [f"{spec.name}.{k}={value[k]!r:.40}" for k in keys if value.get(k) is not None
                      and (isinstance(value[k], bool) or not isinstance(value[k], (int, float)))]
    return wrong


def _check_metric_values(result: "Result") -> None:
    """Every metric the registry reads from the record is a number: one string or list there (a hand-edited
    record) would otherwise fail the aggregation of a whole report, not just its own row."""
    try:
        values = result.metric_values()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CorruptResult(f"its metrics do not read as numbers ({type(exc).__name__}: {exc})") from None
    bad = {name: v for name, v in values.items()
           if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))}
    if bad:
        raise CorruptResult(f"metrics {', '.join(f'{k}={v!r:.40}' for k, v in bad.items())} are not numbers")


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


def write_atomic(path: Path, content: Union[str, bytes, Callable[[Path], None]]) -> None:
    """`content` (text, bytes, or a function that writes a file at the path it is given) written to a
    staging file beside `path`, flushed to disk, then renamed into place: a reader, or a cell resumed
    after a crash, finds the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(staging, 0o666 & ~current_umask())  # mkstemp's 0600 would keep teammates from reading it
    try:
        if callable(content):
            content(Path(staging))
        else:
            Path(staging).write_bytes(content.encode() if isinstance(content, str) else content)
        with open(staging, "rb") as written:
            os.fsync(written.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, payload: Any) -> None:
    """Strict JSON (no NaN/Infinity: see `finite`), written atomically."""
    write_atomic(path, json.dumps(finite(payload), indent=2, sort_keys=False, default=str, allow_nan=False))


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


def _result_paths(root: Path):
    """Every entry named result.json below `root`, a dangling link included: `rglob` passes over one, and
    a result that cannot be read is reported, never silently missing from a table. Like `rglob`, it does
    not descend into linked folders."""
    for folder, folders, files in os.walk(root):
        yield from (Path(folder) / name for name in folders + files if name == RESULT_FILE)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not strict JSON")


@dataclass
class Results:
    """Every record under a dir, and the files that looked like records but were not."""

    records: list[Result]
    corrupt: list[tuple[str, str]]  # (path, why)


def read_results(root: Path) -> Results:
    records, corrupt = [], []
    for path in sorted(_result_paths(Path(root))):
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


def baselines(results: list[Result]) -> dict[int, Result]:
    """{id(result): its baseline record} for every result that has one among `results`: an ok baseline
    cell of the same model, seed and protocol, with the same data and evaluation
    (`identity.BASELINE_SHARES`); the first such, in the order given."""
    def key(result: Result) -> tuple:
        return (result.cell.model, result.cell.seed, result.protocol.get("id") or result.cell.protocol,
                identity.baseline_identity(result.config))

    found: dict[tuple, Result] = {}
    for result in results:
        if result.ok and result.cell.baseline:
            found.setdefault(key(result), result)
    return {id(r): found[key(r)] for r in results if key(r) in found}
