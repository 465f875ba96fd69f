"""Reported vs reproduced: each target of an `experiment=` preset (a paper's number) against our cells,
with a verdict within the target's tolerance and whether the paper's number lies within our seed band."""
from __future__ import annotations

import math
import re
from typing import Optional

import pandas as pd

from bench.core.metrics import display, metric
from bench.core.records import Result, baselines
from reports.table import Table, fmt, percent


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


def _not_run(result: Optional[Result], target: dict, unique: list[Result]) -> str:
    if result is None:
        # a preset run on another model than its paper's (a tiny stand-in) has no cell its targets are about
        models = sorted({r.cell.model for r in unique})
        if models and target["model"] not in models:
            return f"not run: no {target['model']} cell in this sweep (it ran {', '.join(models)})"
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


def _is_dense(target: dict, unique: list[Result]) -> bool:
    """A target about the baseline: its method is the one the sweep's baseline cells ran (`CellKey.baseline`),
    or, with no such cell, the dense preset."""
    methods = {r.cell.method for r in unique if r.cell.baseline}
    return target["method"] in methods if methods else target["method"] == "dense"


def _ours(target: dict, name: str, unique: list[Result], labels: dict[int, str],
          compared: dict[int, Result]) -> dict[str, list[float]]:
    """{row label: our value of each seed} of a target's rows."""
    return {label: [r.value(name, compared.get(id(r))) for r in cells
                    if r.ok and r.value(name, compared.get(id(r))) is not None]
            for label, cells in _target_groups(target, unique, labels).items()}


def _tolerance(target: dict, values: list[float], reported: float) -> tuple[float, str, str]:
    """(tolerance, its unit, how it reads): the measured seed spread (2 sample std, in the metric's units)
    where two or more seeds differ, else the preset's fixed tolerance."""
    spread = float(pd.Series(values).std()) if len(values) > 1 else 0.0
    if spread > 0:
        return 2 * spread, "absolute", f"±{2 * spread:.2f} (2 std, {len(values)} seeds)"
    tolerance, unit = float(target["tolerance"]), target.get("unit", "relative")
    return tolerance, unit, f"±{tolerance:.0%}" if unit == "relative" else f"±{tolerance:g} pts"


def _dense_mean(model: str, name: str, unique: list[Result]) -> Optional[float]:
    values = [v for r in unique if r.ok and r.cell.baseline and r.cell.model == model
              for v in [r.value(name)] if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(pruned: float, dense: Optional[float], name: str) -> str:
    """A pruned number over its own dense number; a metric computed against the dense cell has none."""
    if dense is None or dense == 0 or metric(name).against is not None:
        return "-"
    return f"{pruned / dense:.2f}x"


def targets_table(unique: list[Result], labels: dict[int, str]) -> Optional[Table]:
    """Dense targets first: a paper's pruned number is comparable only when our dense model reproduces the
    paper's dense one (tokenizer, BOS, dtype and evaluation length move both), so every pruned verdict of a
    model and metric whose dense number misses says so, and each pruned number is also given as a ratio to
    its own dense number beside the paper's ratio."""
    targets = []
    for result in unique:
        for target in result.config.get("targets") or []:
            if target not in targets:
                targets.append(target)
    if not targets:
        return None
    targets.sort(key=lambda t: not _is_dense(t, unique))  # stable: the preset's order within each
    rows, compared = [], baselines(unique)
    dense_paper: dict[tuple[str, str], float] = {}
    dense_gap: dict[tuple[str, str], float] = {}  # (model, metric) -> ours vs the paper's dense, where it misses
    for target in targets:
        name, reported = target["metric"], float(target["reported"])
        if metric(name).unit == "%" and reported <= 1.0:
            reported *= 100  # accuracies are compared in %
        key = (target["model"], name)
        dense = _is_dense(target, unique)
        if dense:
            dense_paper[key] = reported
        groups = _target_groups(target, unique, labels) or {target["method"]: []}
        values_of = _ours(target, name, unique, labels, compared)
        for label, cells in groups.items():
            ok = [r for r in cells if r.ok and r.value(name, compared.get(id(r))) is not None]
            first = next(iter(sorted(cells, key=lambda r: not r.ok)), None)
            tolerance, unit, allowed = _tolerance(target, values_of.get(label, []), reported)
            ratios = ["-", "-"]
            if not ok:
                judged = (_not_evaluated(name, first, compared) if first is not None and first.ok
                          else _not_run(first, target, unique))
                text, diff, band, differs = "-", "-", "-", "-"
            else:
                values = values_of[label]
                ours = sum(values) / len(values)
                text = fmt(ours, name) + (f" ± {fmt(pd.Series(values).std(), name)} ({len(values)})"
                                          if len(values) > 1 else "")
                diff = f"{ours - reported:+.2f} ({(ours - reported) / abs(reported):+.1%})"
                judged, band = verdict(ours, reported, tolerance, name, unit), seed_band(values, reported)
                differs = _differences(ok[0], target)
                if dense:
                    if judged != "within tolerance":
                        dense_gap[key] = (ours - reported) / abs(reported)
                else:
                    ratios = [_ratio(ours, _dense_mean(target["model"], name, unique), name), _ratio(reported, dense_paper.get(key), name)]
                    if key in dense_gap:
                        judged += f" (dense differs by {dense_gap[key]:+.1%}: pruned verdicts not comparable)"
            rows.append([target["model"], label, percent(float(target["sparsity"])), name, text,
                         fmt(reported, name), diff, allowed, judged, band, *ratios, differs,
                         str(target.get("source", ""))])
    notes = sorted({f"{t['model']} {t['method']} {t['metric']}: {t['note']}" for t in targets if t.get("note")})
    notes.append("seed band: the paper's number lies inside our mean ± 2 sample std over seeds (two or more seeds)")
    notes.append("tolerance: 2 sample std of our seeds where they differ, else the preset's; dense targets are "
                 "judged first, and a pruned verdict of a model whose dense number misses is not comparable")
    notes.append("ours / dense, paper / dense: the pruned number over the same source's dense number")
    header = ["model", "method", "sparsity", "metric", "ours", "paper", "difference", "tolerance", "verdict",
              "seed band", "ours / dense", "paper / dense", "protocol differences", "source"]
    return Table("Reported vs reproduced", header, rows, notes, caption="Reported vs reproduced",
                 label="tab:prunebench-targets", index=4, paper=_paper(header, rows, notes))


PAPER_COLUMNS = ["model", "method", "metric", "ours", "paper", "difference", "tolerance", "verdict", "over dense"]


def _paper(header: list[str], rows: list[list[str]], notes: list[str]) -> Table:
    """The LaTeX of the targets: the columns a page holds, metrics by display name, sources and protocol
    differences as notes below (the seed band is in the markdown, and in the tolerance where seeds differ)."""
    at = {name: header.index(name) for name in header}
    def cell(row: list[str], column: str) -> str:
        if column == "metric":
            return metric(row[at["metric"]]).label.format(arg=display(row[at["metric"]])[1])
        if column == "method":  # with its sparsity: one column fewer for the page
            return f"{row[at['method']]}, {row[at['sparsity']]}"
        if column == "over dense":  # ours / paper, each over its own dense number
            ratios = row[at["ours / dense"]], row[at["paper / dense"]]
            return "-" if ratios == ("-", "-") else "/".join(ratios)
        if column == "difference":  # the relative one: ours and the paper's stand beside it
            return row[at["difference"]].partition("(")[2].rstrip(")") or row[at["difference"]]
        return row[at[column]]

    # one section per model, its dense targets first (the rows are dense-first across models)
    models = list(dict.fromkeys(row[at["model"]] for row in rows))
    rows = sorted(rows, key=lambda row: models.index(row[at["model"]]))
    shown = [[cell(row, c) for c in PAPER_COLUMNS] for row in rows]
    gaps, counts = [], set()
    for row in shown:  # the dense gap once per model and metric, as a note, not in every verdict
        verdict, _, gap = row[PAPER_COLUMNS.index("verdict")].partition(" (dense differs by ")
        if gap:
            row[PAPER_COLUMNS.index("verdict")] = verdict + "*"
            gaps.append(f"*{row[0]}, {row[2]}: our dense model differs by {gap.partition(':')[0]} from the "
                        f"paper's, so its pruned verdicts are not comparable")
        tolerance = row[PAPER_COLUMNS.index("tolerance")]
        row[PAPER_COLUMNS.index("tolerance")] = re.sub(r" \((\d) std, \d+ seeds\)", r" (\1 sd)", tolerance)
        ours, _, n = row[PAPER_COLUMNS.index("ours")].partition(" (")  # n once, in the caption
        row[PAPER_COLUMNS.index("ours")] = ours
        if ours != "-":
            counts.add(int(n.rstrip(")")) if n else 1)
    notes = list(dict.fromkeys(gaps)) + notes
    seeds = f"{min(counts, default=1)}" + (f" to {max(counts)}" if len(counts) > 1 else "")
    sources = list(dict.fromkeys(row[at["source"]] for row in rows if row[at["source"]]))
    differences = list(dict.fromkeys(f"{row[at['model']]} {row[at['method']]}: {row[at['protocol differences']]}"
                                     for row in rows if row[at["protocol differences"]] not in ("-", "none")))
    columns = list(PAPER_COLUMNS)
    if all(len({r[2] for r in shown if r[0] == model}) == 1 for model in models):
        # one metric per model: it heads the model's section, and the table is a column narrower
        shown = [[f"{row[0]}: {row[2]}", *row[1:2], *row[3:]] for row in shown]
        columns.remove("metric")
    short = {"difference": "diff.", "tolerance": "tol."}  # headers no wider than their numbers
    return Table("Reported vs reproduced", [short.get(c, c) for c in columns], shown,
                 notes + [f"Source: {source}." for source in sources]
                 + [f"Protocol differences, {difference}." for difference in differences],
                 caption="Reported vs reproduced, dense targets first; ours: the mean over n = " + seeds
                         + (" seeds " if max(counts, default=1) > 1 else " seed ")
                         + "(± their sample std where n > 1); over dense: ours / the paper's, each over its own "
                           "dense number", label="tab:prunebench-targets", index=len(columns) - 6,
                 sections=True, dense=True)
