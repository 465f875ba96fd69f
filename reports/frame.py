"""One pandas DataFrame of the result records, the source of every table, plot and verdict.

Row identity (`bench.core.identity.row_identity`): every distinct resolved config (`Result.config`) is
its own row, except that `seed` is a replicate (cells differing only in seed are aggregated into mean,
std and n) and `sparsity` and `model` are the sweep's axes (columns and table sections). The row label
is the method's display name followed by the config keys whose values differ between rows of the same
method, e.g. `OWL (Wanda) (lam=0.04)`, so a `method.lam=0.04,0.08` sweep shows two rows instead of
silently keeping one.

`long_frame` has one row per cell x metric with raw numbers (what the CSV holds), the metrics computed
against a cell's baseline (`acc_avg_drop`) among them; `aggregate` folds the seeds of one row, sparsity
and metric into mean / std / n.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

import pandas as pd

from bench.core.identity import row_identity
from bench.core.metrics import metric
from bench.core.records import CELLS_FILE, Result, baselines, read_manifest
from reports.select import method_label

# Keys already spelled out in the base label (`Wanda (2:4) + 4-bit`).
IN_BASE_LABEL = ("method.name", "method.sparsity_type", "method.wbits")
LONG_COLUMNS = ["model", "row", "method", "baseline", "sparsity", "sparsity_type", "seed", "config_hash", "protocol_id",
                "status", "metric", "label", "value", "stderr", "order"]


def row_labels(results: list[Result]) -> dict[int, str]:
    """{id(result): row label}: the display name plus the keys that differ between the configs of the
    same model and method (ignoring seed and the sweep axes)."""
    # a record written before its preset had a `display` name takes the name a newer record of the same
    # method carries, so a sweep resumed across that change keeps one row per method
    displays = {r.cell.method: r.cell.display for r in results if r.cell.display}
    groups: dict[tuple, list[Result]] = {}
    for result in results:
        cell = dataclasses.replace(result.cell, display=result.cell.display or displays.get(result.cell.method))
        groups.setdefault((result.cell.model, method_label(cell)), []).append(result)
    labels = {}
    for (_, base), members in groups.items():
        flats = [row_identity(r.config) for r in members]
        keys = sorted({k for f in flats for k in f} - set(IN_BASE_LABEL))
        differing = [k for k in keys if len({f.get(k, "-") for f in flats}) > 1]
        for result, flat in zip(members, flats):
            parts = [f"{k.removeprefix('method.')}={flat.get(k, '-')}" for k in differing]
            labels[id(result)] = f"{base} ({', '.join(parts)})" if parts else base
    return labels


def sweep_order(results: list[Result], sweep_dir: Optional[Path]) -> dict[int, int]:
    """{id(result): position}: the order the sweeps under `sweep_dir` listed their cells in (`cells.json`,
    i.e. the preset's method order), else the job number of the cell's dir, else the path."""
    manifests = sorted(Path(sweep_dir).rglob(CELLS_FILE)) if sweep_dir is not None else []
    position: dict[str, int] = {}
    for path in manifests:
        for cell in read_manifest(path.parent) or []:
            position.setdefault(cell["config_hash"], len(position))

    def job_number(result: Result) -> int:
        match = re.match(r"(\d+)_", Path(result.path or "").parent.name)
        return int(match.group(1)) if match else 1 << 30

    ranked = sorted(results, key=lambda r: (position.get(r.config_hash, 1 << 30), job_number(r), r.path or ""))
    return {id(r): i for i, r in enumerate(ranked)}


def long_frame(results: list[Result], sweep_dir: Optional[Path] = None) -> pd.DataFrame:
    """One row per cell x metric (a failed or running cell: one row without a metric), raw numbers."""
    labels, order, compared = row_labels(results), sweep_order(results, sweep_dir), baselines(results)
    rows = []
    for result in results:
        cell = result.cell
        base = {"model": cell.model, "row": labels[id(result)], "method": cell.method, "baseline": cell.baseline,
                "sparsity": 0.0 if cell.baseline else cell.sparsity, "sparsity_type": cell.sparsity_type,
                "seed": cell.seed, "config_hash": result.config_hash,
                "protocol_id": result.protocol.get("id") or cell.protocol, "status": result.status,
                "order": order[id(result)]}
        values = result.metric_values(compared.get(id(result))) if result.ok else {}
        for name, value in values.items():
            rows.append({**base, "metric": name, "label": metric(name).heading(result.metrics, name.partition("/")[2]),
                         "value": value, "stderr": _stderr(result, name)})
        if not values:
            rows.append({**base, "metric": None, "label": None, "value": float("nan"), "stderr": float("nan")})
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def _stderr(result: Result, name: str) -> float:
    family, _, task = name.partition("/")
    if family != "acc":
        return float("nan")
    stderr = result.metrics.get("zeroshot", {}).get("tasks", {}).get(task, {}).get("stderr")
    return float("nan") if stderr is None else 100 * stderr


def aggregate(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1), n and mean lm-eval stderr over the seeds of each (model, row, sparsity,
    metric), with the row's first position in the sweep and its protocol ids."""
    measured = long.dropna(subset=["metric"])
    keys = ["model", "row", "sparsity", "metric"]
    grouped = measured.groupby(keys, sort=False)
    out = grouped["value"].agg(mean="mean", std="std", n="count").reset_index()
    out["stderr"] = grouped["stderr"].mean().to_numpy()
    out["seeds"] = grouped["seed"].agg(lambda s: ",".join(str(v) for v in sorted(s))).to_numpy()
    out["protocol_id"] = grouped["protocol_id"].agg(lambda s: ",".join(sorted(set(s)))).to_numpy()
    out["label"] = grouped["label"].first().to_numpy()
    return out
