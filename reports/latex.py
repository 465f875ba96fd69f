"""The results table as a paper prints it (its LaTeX): rows grouped by how much was pruned, columns by
model, metric family and dataset or task.

- The dense baseline is a row group of its own, not a row under a sparsity it was never pruned to.
- Unstructured, each N:M pattern and structured pruning are separate row groups, even at the same
  nominal sparsity: a structured method's 40% are FFN channels (a smaller share of parameters, printed in
  the group's heading), an unstructured one's 40% are weights; bold marks the best pruned value within a
  group only, where the numbers are comparable.
- Datasets, tasks and metrics print under their display names (`bench.core.metrics.display`).
- mean ± std over seeds only where a cell has more than one seed, n in the caption; a single seed prints
  its value alone (lm-eval's stderr stays in the markdown and CSV).
- The protocol is described in words below the table (calibration, evaluation, lm-eval), with every
  warning and failure; its hash is in the CSV.
"""
from __future__ import annotations

import pandas as pd

from bench.core.metrics import MIRROR, display, metric
from bench.core.records import Result
from reports.frame import aggregate, row_labels
from reports.table import Table, fmt, percent

DENSE = "dense"
STRUCTURED = "structured"


def _kind(result: Result) -> str:
    """dense, unstructured, an N:M pattern (`2:4`) or structured (FFN channels removed physically)."""
    if result.cell.baseline:
        return DENSE
    return STRUCTURED if "ffn_channels_removed" in result.sparsity else result.cell.sparsity_type


def _group_order(key: tuple[str, float]) -> tuple:
    kind, sparsity = key
    return (kind != DENSE, kind == STRUCTURED, kind != "unstructured", kind, sparsity)


def _heading(kind: str, sparsity: float, members: list[Result], sparsities: set) -> str:
    if kind == DENSE:
        return "Dense"
    if kind == "unstructured":
        return f"{percent(sparsity, sparsities)} unstructured sparsity"
    if kind != STRUCTURED:
        return f"{kind} semi-structured sparsity"
    removed = pd.Series([r.sparsity["params_removed"] for r in members if "params_removed" in r.sparsity]).mean()
    return (f"{percent(sparsity, sparsities)} of FFN channels removed"
            + ("" if pd.isna(removed) else f" ({removed:.1%} of parameters)"))


def _protocol_words(results: list[Result]) -> list[str]:
    """How the cells were calibrated and evaluated, as sentences a reader follows without our config (the
    dense cells share the evaluation and have no calibration)."""
    calibrations, evaluations = [], []
    for result in (r for r in results if r.ok):
        calib = result.data.get("calib", {})
        if calib and not result.cell.baseline:
            calibrations.append(f"{calib['nsamples']} sequences of {calib['seqlen']} tokens from "
                                f"{display('ppl/' + calib['dataset'])[1]} ({calib['split']} split)")
        parts = [f"{display('ppl/' + name)[1]} on its {info['split']} split, {info['windows']} windows of "
                 f"{info['seqlen']} tokens" for name, info in result.data.get("eval", {}).items()]
        zeroshot = result.metrics.get("zeroshot")
        if zeroshot:
            limit = "all examples" if zeroshot["limit"] is None else f"the first {zeroshot['limit']} examples"
            parts.append(f"zero-shot accuracy with lm-eval {zeroshot['lm_eval']}, {zeroshot['num_fewshot']}-shot, "
                         f"on {limit} of each task ({zeroshot['source']})")
        evaluations.append("; ".join(parts))
    return ([f"Calibration: {c}." for c in dict.fromkeys(calibrations)]
            + [f"Evaluation: {e}." for e in dict.fromkeys(evaluations) if e])


def paper_results(unique: list[Result], long: pd.DataFrame, metric_names: list[str],
                  row_order: list[tuple[str, str]], notes: list[str]) -> Table:
    """The results table's LaTeX layout; `metric_names` and `row_order` are the results table's columns
    and (model, row label) order, `notes` its warnings and failures."""
    labels = row_labels(unique)
    models = list(dict.fromkeys(model for model, _ in row_order))
    rank = {key: i for i, key in enumerate(row_order)}
    # numbers of different protocols never sit side by side unmarked: within a model, rows of another
    # protocol carry a mark (p1, p2, ...) that a note resolves to the protocol ids of the CSV
    per_model = long.groupby("model")["protocol_id"].nunique()
    marks = {pid: f"p{i + 1}" for i, pid in enumerate(sorted(set(long.loc[long["model"].isin(
        per_model.index[per_model > 1]), "protocol_id"])))}
    groups: dict[tuple[str, str, float], list[Result]] = {}
    for result in unique:
        sparsity = 0.0 if result.cell.baseline else result.cell.sparsity
        groups.setdefault((result.cell.model, _kind(result), sparsity), []).append(result)
    agg = aggregate(long).set_index(["model", "row", "sparsity", "metric"])
    multi = agg.loc[agg["n"] > 1, "n"]
    show_n = multi.nunique() > 1  # one n for every cell goes in the caption; several: beside each value

    def cell(model: str, label: str, sparsity: float, name: str, members: list[Result]) -> tuple[str, float]:
        key = (model, label, sparsity, name)
        if key not in agg.index:
            statuses = {r.status for r in members if r.cell.model == model and labels[id(r)] == label}
            return ("failed" if "failed" in statuses else "running" if statuses - {"ok"} else "-"), float("nan")
        entry = agg.loc[key]
        if entry["n"] <= 1:
            return fmt(entry["mean"], name), entry["mean"]
        spread = f"{fmt(entry['mean'], name)} ± {fmt(entry['std'], name)}"
        return spread + (f" ({entry['n']})" if show_n else ""), entry["mean"]

    names = [name for name in metric_names if metric(name).against is None]  # the dense group beside says it
    rows, bold, starts = [], set(), {}
    for (model, kind, sparsity), members in sorted(groups.items(), key=lambda item: (
            models.index(item[0][0]), _group_order(item[0][1:]))):
        starts[len(rows)] = f"{model}: {_heading(kind, sparsity, members, {key[2] for key in groups})}"
        keys = sorted({labels[id(r)] for r in members}, key=lambda label: rank.get((model, label), len(rank)))
        first, means = len(rows), []
        for label in keys:
            ids = sorted(set(long.loc[(long["model"] == model) & (long["row"] == label), "protocol_id"]))
            mark = ",".join(marks[pid] for pid in ids if pid in marks)
            cells = [cell(model, label, sparsity, name, members) for name in names]
            rows.append([label + (f" ({mark})" if mark else ""), *(text for text, _ in cells)])
            means.append([mean for _, mean in cells])
        if kind != DENSE and len(keys) > 1:
            frame = pd.DataFrame(means)
            for c in frame.columns:
                column = frame[c].dropna()
                if len(column) > 1:
                    best = column.min() if metric(names[c]).lower_is_better else column.max()
                    bold |= {(first + r, c + 1) for r in column.index[column == best]}
    mirrored = {name for name in names  # a score on offline mirrors never passes for the benchmark's
                if long.loc[long["metric"] == name, "label"].str.contains(MIRROR, regex=False).any()}
    header = ["Method", *(display(name)[1] + (MIRROR if name in mirrored else "") for name in names)]
    families = ["", *(display(name)[0] for name in names)]
    seeds = (f" Mean ± sample standard deviation over n = {int(multi.iloc[0])} seeds where a cell ran several; "
             f"a single seed's value alone." if len(multi) and not show_n else
             " Mean ± sample standard deviation over n seeds (n in parentheses) where a cell ran several; "
             "a single seed's value alone." if len(multi) else "")
    directions = {display(n)[0]: "lower" if metric(n).lower_is_better else "higher" for n in names}
    caption = (" and ".join(f"{family} ({direction} is better)" for family, direction in directions.items())
               + " of the dense model and of each pruning method"
               + ". Bold: the best pruned value of its column within a sparsity group." + seeds)
    protocols = [f"Protocols: {', '.join(f'{m}: {pid}' for pid, m in marks.items())}; numbers of different protocols "
                 f"are not comparable."] if marks else []
    return Table("Results", header, rows, _protocol_words(unique) + protocols + notes, bold=bold, caption=caption,
                 label="tab:prunebench-results", index=1, groups=starts, levels=[families, header])
