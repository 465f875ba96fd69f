"""Reported vs reproduced: each target of an `experiment=` preset (a paper's number) against our cells,
with a verdict within the target's tolerance and whether the paper's number lies within our seed band."""
from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from bench.core.metrics import metric
from bench.core.records import Result, baselines
from reports.table import Table, fmt


def _target_groups(target: dict, unique: list[Result], labels: dict[int, str]) -> dict[str, list[Result]]:
    """{row label: its cells (one per seed)} of the rows a target is about."""
    groups: dict[str, list[Result]] = {}
    for r in unique:
        if r.cell.model == target["model"] and r.cell.method == target["method"] \
                and (r.cell.baseline or math.isclose(r.cell.sparsity, float(target["sparsity"]))):
            groups.setdefault(labels[id(r)], []).append(r)
    return groups


def verdict(ours: float, reported: float, tolerance: float, name: str, unit: str = "relative") -> str:
    """`unit: relative`: tolerance is a fraction of the paper's number; `absolute`: points of the metric."""
    gap = ours - reported if unit == "absolute" else (ours - reported) / abs(reported)
    if abs(gap) <= tolerance:
        return "within tolerance"
    improved = gap < 0 if metric(name).lower_is_better else gap > 0
    return "better" if improved else "worse"


def seed_band(values: list[float], reported: float) -> str:
    """Whether the paper's number lies inside mean ± 2 sample std of our seeds (two or more seeds)."""
    if len(values) < 2:
        return "-"
    mean, std = float(pd.Series(values).mean()), float(pd.Series(values).std())
    return "within seed band" if abs(reported - mean) <= 2 * std else "outside seed band"


def _not_run(result: Optional[Result]) -> str:
    if result is None:
        return "not run: no result in this sweep"
    if result.status == "failed":
        if "load" not in result.timings:  # the model never loaded
            return "not run: weights unavailable"
        return f"not run: failed ({result.error.type})"
    return f"not run: {result.status}"


def _not_evaluated(name: str, result: Result, compared: dict[int, Result]) -> str:
    if metric(name).against is not None and id(result) not in compared:
        return f"not run: {name} needs a baseline cell (dense) of the same model, seed, protocol, data and eval"
    return f"not run: {name} not evaluated"


def _differences(result: Result, target: dict) -> str:
    """Where the cell's protocol differs from the paper's (the cell records it when the preset carries
    `paper_protocol`)."""
    if "paper_differences" not in result.protocol:
        return "-"
    return "; ".join(result.protocol["paper_differences"]) or "none"


def targets_table(unique: list[Result], labels: dict[int, str]) -> Optional[Table]:
    targets = []
    for result in unique:
        for target in result.config.get("targets") or []:
            if target not in targets:
                targets.append(target)
    if not targets:
        return None
    rows, compared = [], baselines(unique)
    for target in targets:
        name, reported, tolerance = target["metric"], float(target["reported"]), float(target["tolerance"])
        unit = target.get("unit", "relative")
        if metric(name).unit == "%" and reported <= 1.0:
            reported *= 100  # accuracies are compared in %
        allowed = f"±{tolerance:.0%}" if unit == "relative" else f"±{tolerance:g} pts"
        groups = _target_groups(target, unique, labels) or {target["method"]: []}
        for label, cells in groups.items():
            ok = [r for r in cells if r.ok and r.value(name, compared.get(id(r))) is not None]
            first = next(iter(sorted(cells, key=lambda r: not r.ok)), None)
            if not ok:
                judged = _not_evaluated(name, first, compared) if first is not None and first.ok else _not_run(first)
                text, diff, band, differs = "-", "-", "-", "-"
            else:
                values = [r.value(name, compared.get(id(r))) for r in ok]
                ours = sum(values) / len(values)
                text = fmt(ours, name) + (f" ± {fmt(pd.Series(values).std(), name)} ({len(values)})"
                                          if len(values) > 1 else "")
                diff = f"{ours - reported:+.2f} ({(ours - reported) / abs(reported):+.1%})"
                judged, band = verdict(ours, reported, tolerance, name, unit), seed_band(values, reported)
                differs = _differences(ok[0], target)
            rows.append([target["model"], label, f"{float(target['sparsity']):.0%}", name, text,
                         fmt(reported, name), diff, allowed, judged, band, differs, str(target.get("source", ""))])
    notes = sorted({f"{t['model']} {t['method']} {t['metric']}: {t['note']}" for t in targets if t.get("note")})
    notes.append("seed band: the paper's number lies inside our mean ± 2 sample std over seeds (two or more seeds)")
    return Table("Reported vs reproduced", ["model", "method", "sparsity", "metric", "ours", "paper", "difference",
                                            "tolerance", "verdict", "seed band", "protocol differences", "source"],
                 rows, notes, caption="Reported vs reproduced", label="tab:prunebench-targets", index=4)

