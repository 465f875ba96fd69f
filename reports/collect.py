"""Collect the result records under a sweep dir into paper-style tables (markdown, CSV, LaTeX, HTML).

Every table is built from one DataFrame of the records (`reports.frame`): every distinct resolved config
is its own row, labelled by the keys that differ (`owl_wanda (lam=0.04)`); cells that differ only in
`seed` are one row showing mean ± std (n).
- Results table (the papers' layout): rows = model x config, the baseline (dense) first, then the sweep's (the preset's)
  order; columns = sparsity (top header) x metric (perplexity per dataset, zero-shot accuracy per task
  in % with lm-eval's stderr, their average, its drop against the baseline cell: the registry's
  results metrics, `bench.core.metrics`). The best pruned mean per column and model is bold. Numbers
  of different protocol ids get a protocol column.
- Details table, one row per cell (and seed): measured sparsity, parameters removed, allocation, pruning
  and whole-cell time, peak memory, the registry's details metrics (speed-ups).
- Targets table, for `experiment=` presets: ours (over seeds), the paper's number, the difference, a
  verdict within the target's tolerance (`unit: relative` or `absolute` points), whether the paper's number
  lies within our seed band (mean ± 2 std), and where the protocols differ.

CSV: `table.csv` is long (one row per cell x metric, raw numbers, config hash, protocol id, seed),
`table_wide.csv` the results table as numbers (mean, std, n). LaTeX is written by `reports.table` (booktabs,
one header row per level with `\\cmidrule`, never scaled down), the results table in the layout a paper
prints (`reports.latex`); HTML comes from pandas' Styler. A cell that failed shows "failed", one never run "-": a number only
ever comes from a result file. Footnotes give each protocol, every fallback warning and failure, and
every file under the sweep that is not a readable record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from bench.core.metrics import METRICS, MIRROR, display, metric, names
from bench.core.records import Result, baselines, read_results, write_atomic
from reports import league
from reports.frame import aggregate, long_frame, row_labels
from reports.html import render
from reports.latex import paper_results
from reports.plots import write_plots
from reports.select import unique_results
from reports.table import Table, csv_escape, fmt, percent
from reports.targets import targets_table

FORMATS = ("md", "csv", "tex", "html")


@dataclass
class Report:
    """Everything `collect` produces; `markdown` is the results table followed by the others."""

    results: Table
    details: Optional[Table]
    targets: Optional[Table]
    records: list[Result]  # the deduplicated results, for plots and W&B
    long: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per cell x metric (reports.frame)
    written: list[Path] = field(default_factory=list)

    @property
    def tables(self) -> list[Table]:
        return [t for t in (self.results, self.details, self.targets) if t is not None]

    @property
    def markdown(self) -> str:
        return "\n\n".join((f"## {t.title}\n\n" if t is not self.results else "") + t.markdown for t in self.tables)


def _metric_columns(unique: list[Result], table: str) -> list[tuple[str, str]]:
    """(metric name, column label) of every metric of `table` (`Metric.table`) the records hold, in
    registry order (perplexity per dataset, accuracy per task, their average, the drop against the
    baseline), each family's arguments in the order the records list them."""
    compared = baselines(unique)
    holders: dict[str, dict] = {}  # the first record holding each name: some labels depend on the record
    for result in (r for r in unique if r.ok):
        baseline = compared.get(id(result))
        for name in names(result.metrics, None if baseline is None else baseline.metrics):
            holders.setdefault(name, result.metrics)
    return [(name, entry.heading(metrics, name.partition("/")[2])) for entry in METRICS.values() if entry.table == table
            for name, metrics in holders.items() if name.partition("/")[0] == entry.name]


def _show(entry: pd.Series, name: str) -> str:
    """mean ± std (n) over seeds; one seed: the value, ± lm-eval's stderr where it has one."""
    if entry["n"] > 1:
        return f"{fmt(entry['mean'], name)} ± {fmt(entry['std'], name)} ({entry['n']})"
    if not math.isnan(entry["stderr"]):
        return f"{fmt(entry['mean'], name)} ± {fmt(entry['stderr'], name)}"
    return fmt(entry["mean"], name)


def _row_keys(long: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, row label) in paper order: models as the sweep listed them, dense first, then the preset's
    method order."""
    firsts = long.groupby(["model", "row"], sort=False).agg(order=("order", "min"), baseline=("baseline", "first"))
    model_order = long.groupby("model", sort=False)["order"].min()
    keys = sorted(firsts.index, key=lambda k: (model_order[k[0]], not firsts.loc[k, "baseline"],
                                               firsts.loc[k, "order"]))
    return list(keys)


def results_table(unique: list[Result], long: pd.DataFrame) -> Table:
    metric_cols = _metric_columns(unique, "results")
    sparsities = sorted({r.cell.sparsity for r in unique if not r.cell.baseline}) or [0.0]
    columns = [(s, m) for s in sparsities for m, _ in metric_cols]
    labels = dict(metric_cols)
    protocols = sorted(set(long["protocol_id"]))
    marked = len(protocols) > 1  # numbers of different protocols never sit side by side unmarked
    lead = ["model", "method"] + (["protocol"] if marked else [])
    header = lead + [f"{percent(s, sparsities)} {labels[m]}" for s, m in columns]
    spans = [""] * len(lead) + [percent(s, sparsities) for s, _ in columns]
    agg = aggregate(long).set_index(["model", "row", "sparsity", "metric"])
    keys = _row_keys(long)
    dense = set(map(tuple, long.loc[long["baseline"], ["model", "row"]].drop_duplicates().to_numpy()))

    rows, means = [], {}
    for r, (model, label) in enumerate(keys):
        cells = long[(long["model"] == model) & (long["row"] == label)]
        row = [model, label] + ([",".join(sorted(set(cells["protocol_id"])))] if marked else [])
        for c, (sparsity, name) in enumerate(columns):
            at = 0.0 if (model, label) in dense else sparsity
            key = (model, label, at, name)
            if key in agg.index:
                row.append(_show(agg.loc[key], name))
                means[(r, c + len(lead))] = agg.loc[key, "mean"]
                continue
            statuses = set(cells.loc[cells["sparsity"] == at, "status"])
            row.append("failed" if "failed" in statuses else "running" if statuses - {"ok"} else "-")
        rows.append(row)
    bold = set()
    for c in range(len(lead), len(header)):
        name = columns[c - len(lead)][1]
        for model in {k[0] for k in keys}:
            candidates = [(means[(r, c)], r) for r, k in enumerate(keys)
                          if k[0] == model and k not in dense and (r, c) in means]
            if len(candidates) > 1:
                best = (min if metric(name).lower_is_better else max)(v for v, _ in candidates)
                bold |= {(r, c) for v, r in candidates if v == best}
    caption = ("Results: " + ", ".join(labels.values()) + " at each sparsity; best pruned value per column in bold"
               if labels else "Results")
    return Table("Results", header, rows, bold=bold, caption=caption, label="tab:prunebench-results",
                 spans=spans, index=len(lead), data=long.drop(columns="order"))


def _seed_note(long: pd.DataFrame) -> list[str]:
    notes = []
    if long.dropna(subset=["metric"]).groupby(["model", "row", "sparsity", "metric"])["seed"].nunique().gt(1).any():
        notes.append("a ± b (n): mean and sample standard deviation over n seeds (each seed's value is in "
                     "table.csv)")
    if long["stderr"].notna().any():
        notes.append("accuracies of a single seed: value ± lm-eval's standard error")
    ids = sorted(set(long["protocol_id"]))
    if len(ids) == 1:
        notes.append(f"every number: protocol id {ids[0]}")
    else:
        notes.append(f"protocol ids differ ({', '.join(ids)}): the protocol column marks which numbers "
                     f"are comparable")
    return notes


def _protocol_note(result: Result) -> str:
    calib = result.data.get("calib", {})
    evals = result.data.get("eval", {})
    parts = [f"protocol `{result.cell.protocol}`"]
    if calib and not result.cell.baseline:
        parts.append(f"calibration {calib['dataset']}/{calib['split']} {calib['nsamples']} x {calib['seqlen']} tokens")
    for name, info in evals.items():
        parts.append(f"{name}: {info['dataset']}/{info['split']}, {info['windows']} windows x {info['seqlen']} tokens")
    zeroshot = result.metrics.get("zeroshot")
    if zeroshot:
        limit = "all" if zeroshot["limit"] is None else zeroshot["limit"]
        parts.append(f"zero-shot: lm-eval {zeroshot['lm_eval']}, {zeroshot['num_fewshot']}-shot, {limit} examples "
                     f"per task, {zeroshot['source']}")
    return "; ".join(parts)


def _footnotes(unique: list[Result], corrupt: list[tuple[str, str]]) -> list[str]:
    notes = sorted({_protocol_note(r) for r in unique if r.ok})
    sparsities = {r.cell.sparsity for r in unique}
    for result in unique:
        for warning in result.warnings:
            notes.append(f"WARNING ({result.cell.method}): {warning}")
        if result.status == "failed":
            message = (result.error.message or "").splitlines()[:1]  # one line keeps the footnote list intact
            notes.append(f"failed: {result.cell.model} {result.cell.method} "
                         f"{percent(result.cell.sparsity, sparsities)}: {result.error.type}: {''.join(message)} "
                         f"({result.path})")
    notes += [f"not a result, left alone: {path}: {why}" for path, why in corrupt]
    return list(dict.fromkeys(notes))


# --- per-cell details ----------------------------------------------------------------------------

DETAILS = (  # column label, how to read it from a result (None = not present)
    ("measured sparsity", lambda r: _pct(r.sparsity.get("measured"))),
    ("params removed", lambda r: _pct(r.sparsity.get("params_removed"))),
    # an allocator's own cost (dense statistics, a search) apart from the pruning pass: the league's budgets
    ("allocation time (s)", lambda r: _num(_total(r.timings, "allocate_observe", "allocate"), "{:.1f}")),
    ("pruning time (s)", lambda r: _num(r.timings.get("prune"), "{:.1f}")),
    ("cell time (s)", lambda r: _num(r.timings.get("total"), "{:.0f}")),
    ("peak memory (MB)", lambda r: _num(r.peak_memory.get("cuda_mb", r.peak_memory.get("rss_mb")), "{:.0f}")),
)  # then the registry's details metrics (`Metric.table`), e.g. the speed-ups
# LaTeX: (heading over a family of columns, column) of each, so labels do not set the columns' widths
# and the table fits a page without being scaled down
DETAILS_LATEX = {"measured sparsity": ("Sparsity", "measured"), "params removed": ("Sparsity", "params"),
                 "allocation time (s)": ("Time (s)", "alloc."), "pruning time (s)": ("Time (s)", "prune"),
                 "cell time (s)": ("Time (s)", "cell"), "peak memory (MB)": ("Memory", "MB")}


def _total(timings: dict, *stages: str) -> Optional[float]:
    present = [timings[stage] for stage in stages if stage in timings]
    return sum(present) if present else None


def _pct(value) -> Optional[str]:
    """One decimal, unless that rounds a fraction strictly between 0 and 1 to 0.0% or 100.0% (a sparsity of
    0.99986 is not an empty model): then as many as it takes."""
    if value is None:
        return None
    text = f"{100 * value:.1f}%"
    return text if value <= 0 or value >= 1 or 0 < float(text[:-1]) < 100 else percent(value)


def _num(value, pattern: str) -> Optional[str]:
    return None if value is None else pattern.format(value)


def _shown(name: str) -> Callable[[Result], Optional[str]]:
    def read(result: Result) -> Optional[str]:
        value = result.value(name)
        return None if value is None else metric(name).format(value)
    return read


def details_table(unique: list[Result], labels: dict[int, str], rows_in_order: list[tuple[str, str]]) -> Optional[Table]:
    rank = {key: i for i, key in enumerate(rows_in_order)}  # the results table's row order
    ok = sorted((r for r in unique if r.ok),
                key=lambda r: (rank[(r.cell.model, labels[id(r)])], r.cell.sparsity, r.cell.seed))
    columns = [*DETAILS, *((label, _shown(name)) for name, label in _metric_columns(unique, "details"))]
    present = [(label, read) for label, read in columns if any(read(r) is not None for r in ok)]
    if not present:
        return None
    seeds = len({r.cell.seed for r in ok}) > 1
    sparsities = {r.cell.sparsity for r in ok}
    rows = [[r.cell.model, labels[id(r)], percent(r.cell.sparsity, sparsities)] + ([str(r.cell.seed)] if seeds else [])
            + [read(r) or "-" for _, read in present] for r in ok]
    notes = ["peak memory: CUDA max allocated when on a GPU, else the process's max RSS"]
    lead = ["model", "method", "sparsity"] + (["seed"] if seeds else [])
    shown = {label: DETAILS_LATEX.get(label) or display(name) for name, label in _metric_columns(unique, "details")}
    shown.update(DETAILS_LATEX)
    latex = [("", head) for head in lead] + [shown[label] for label, _ in present]
    return Table("Details per cell", lead + [label for label, _ in present], rows, notes,
                 caption="Details of every cell", label="tab:prunebench-details", index=len(lead), sections=True,
                 levels=[[family for family, _ in latex], [column for _, column in latex]])


# --- entry point ---------------------------------------------------------------------------------

def build_report(results: list[Result], corrupt: list[tuple[str, str]] = (), sweep_dir: Optional[Path] = None) -> Report:
    unique = unique_results(results)
    long = long_frame(unique, sweep_dir)
    labels = row_labels(unique)
    table = results_table(unique, long)
    table.footnotes = _seed_note(long) + _footnotes(unique, list(corrupt))
    problems = [note for note in table.footnotes if note.startswith(("WARNING", "failed:", "not a result"))]
    table.paper = paper_results(unique, long, [name for name, _ in _metric_columns(unique, "results")],
                                _row_keys(long), problems)
    return Report(table, details_table(unique, labels, _row_keys(long)), targets_table(unique, labels), unique, long)


def collect(sweep_dir: Path, write: bool = True, formats: tuple = ("md", "csv"), plots: bool = False) -> Report:
    """Read every result.json under `sweep_dir`; write table.<fmt>, report.html and plots/ there."""
    sweep_dir = Path(sweep_dir)
    found = read_results(sweep_dir)
    if not found.records:
        raise FileNotFoundError(f"no result.json under {sweep_dir}"
                                + (f" ({len(found.corrupt)} unreadable)" if found.corrupt else ""))
    report = build_report(found.records, found.corrupt, sweep_dir)
    if write:
        images = []
        if plots:
            images = write_plots(report.records, sweep_dir / "plots", report.long)
        for fmt in formats:
            report.written += _write(report, sweep_dir, fmt, [p for p in images if p.suffix == ".png"])
        report.written += images
        report.written += league.write(report.records, report.long, sweep_dir, plots)
    return report


def _wide(report: Report) -> str:
    """The results table with raw numbers: mean, std and n of every (row, sparsity, metric)."""
    agg = aggregate(report.long)
    wide = agg.pivot_table(index=["model", "row"], columns=["sparsity", "metric"], values=["mean", "std", "n"],
                           sort=False).astype({("n",) + key: "Int64" for key in agg.groupby(["sparsity", "metric"]).groups})
    stats = ["mean", "std", "n"]
    wide = wide[sorted(wide.columns, key=lambda c: (c[1], list(agg["metric"].unique()).index(c[2]), stats.index(c[0])))]
    sparsities = set(agg["sparsity"])
    long = report.long
    mirrored = set(long.loc[long["label"].str.contains(MIRROR, regex=False, na=False), "metric"])
    wide.columns = [f"{percent(s, sparsities)} {m}{MIRROR if m in mirrored else ''} {stat}"
                    for stat, s, m in wide.columns]
    return wide.reset_index().map(csv_escape).to_csv(index=False)


def _write(report: Report, sweep_dir: Path, fmt: str, images: list[Path]) -> list[Path]:
    if fmt == "md":
        paths = {sweep_dir / "table.md": report.markdown + "\n"}
    elif fmt == "csv":
        paths = {sweep_dir / ("table.csv" if t is report.results else f"table_{t.title.split()[0].lower()}.csv"): t.csv
                 for t in report.tables}
        paths[sweep_dir / "table_wide.csv"] = _wide(report)
    elif fmt == "tex":
        paths = {sweep_dir / "table.tex": "% \\usepackage{booktabs}\n"
                 + "\n\n".join(t.latex for t in report.tables) + "\n"}
    else:
        paths = {sweep_dir / "report.html": render(report, f"prunebench report: {sweep_dir.name}", images)}
    for path, text in paths.items():
        write_atomic(path, text)  # replaces a symlink planted at the name instead of writing through it
    return list(paths)
