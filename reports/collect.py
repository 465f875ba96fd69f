"""Collect the result records under a sweep dir into paper-style tables (markdown, CSV, LaTeX, HTML).

Every table is built from one DataFrame of the records (`reports.frame`): every distinct resolved config
is its own row, labelled by the keys that differ (`owl_wanda (lam=0.04)`); cells that differ only in
`seed` are one row showing mean ± std (n).
- Results table (the papers' layout): rows = model x config, dense first, then the sweep's (the preset's)
  order; columns = sparsity (top header) x metric (perplexity per dataset, zero-shot accuracy per task
  in % with lm-eval's stderr, their average). The best pruned mean per column and model is bold. Numbers
  of different protocol ids get a protocol column.
- Details table, one row per cell (and seed): measured sparsity, parameters removed, allocation, pruning
  and whole-cell time, peak memory, speed-ups ("not measured" for N:M on CPU).
- Targets table, for `experiment=` presets: ours (over seeds), the paper's number, the difference, a
  verdict within the target's tolerance (`unit: relative` or `absolute` points), whether the paper's number
  lies within our seed band (mean ± 2 std), and where the protocols differ.

CSV: `table.csv` is long (one row per cell x metric, raw numbers, config hash, protocol id, seed),
`table_wide.csv` the results table as numbers (mean, std, n). LaTeX and HTML come from pandas' Styler
(booktabs, caption, label, notes). A cell that failed shows "failed", one never run "-": a number only
ever comes from a result file. Footnotes give each protocol, every fallback warning and failure, and
every file under the sweep that is not a readable record.
"""
from __future__ import annotations

import csv
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from bench.core.records import Result, metric, read_results
from reports.frame import aggregate, long_frame, row_labels
from reports.html import render
from reports.plots import write_plots
from reports.select import unique_results

FORMATS = ("md", "csv", "tex", "html")


def _latex_escape(text: str) -> str:
    text = text.replace("\\", r"\textbackslash{}")
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text.replace("~", r"\textasciitilde{}").replace("^", r"\^{}").replace("±", r"$\pm$")


_MULTIROW = re.compile(r"\\multirow\[[^\]]*\]\{\d+\}\{\*\}\{([^}]*)\}")
_NUMBER_LIKE = re.compile(r"^([-+]?\d|[-+]?\.\d|-$|failed$|running$|not measured)")


@dataclass
class Table:
    """A table as strings, written as markdown (flat header), CSV, and through pandas' Styler as LaTeX
    (booktabs, caption, label, notes) and HTML. `spans`, when set, is the top header level of every
    column (the sparsity a metric belongs to); `index` leading columns name the row."""

    title: str
    header: list[str]
    rows: list[list[str]]
    footnotes: list[str] = field(default_factory=list)
    bold: set = field(default_factory=set)  # (row index, column index) of the best value per column
    caption: str = ""
    label: str = ""
    spans: Optional[list[str]] = None
    index: int = 2
    data: Optional[pd.DataFrame] = None  # raw numbers, for the CSV

    def _cells(self, wrap) -> list[list[str]]:
        return [[wrap(text) if (r, c) in self.bold else text for c, text in enumerate(row)]
                for r, row in enumerate(self.rows)]

    @property
    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self._cells(lambda t: f"**{t}**")]
        if self.footnotes:
            lines.append("")
            lines += [f"- {note}" for note in self.footnotes]
        return "\n".join(lines)

    @property
    def csv(self) -> str:
        if self.data is not None:
            return self.data.to_csv(index=False)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buffer.getvalue()

    def _styler(self, escape: str):
        columns = [(span, head[len(span):].strip()) for span, head in zip(self.spans, self.header)] \
            if self.spans else self.header
        frame = pd.DataFrame(self.rows, columns=pd.MultiIndex.from_tuples(columns) if self.spans else columns)
        if self.index:
            frame = frame.set_index(list(frame.columns[:self.index]))
            frame.index.names = self.header[:self.index]
        styler = frame.style.format(escape=escape).format_index(escape=escape, axis=0) \
            .format_index(escape=escape, axis=1)
        bold = pd.DataFrame("", index=frame.index, columns=frame.columns)
        for r, c in self.bold:
            bold.iat[r, c - self.index] = "font-weight: bold;"
        styler = styler.apply(lambda _: bold, axis=None)
        text = [i for i, head in enumerate(frame.columns)
                if any(not _NUMBER_LIKE.match(row[i + self.index]) for row in self.rows)]
        if text:
            styler = styler.set_properties(subset=[frame.columns[i] for i in text],
                                           **{"text-align": "left", "white-space": "normal"})
        if not self.index:
            styler = styler.hide(axis="index")
        return styler.hide(names=True, axis="columns") if self.spans else styler

    @property
    def latex(self) -> str:
        """A float `table` for `\\usepackage{booktabs,graphicx}`; shrunk to the line width only when wider."""
        body = self._styler("latex").to_latex(
            hrules=True, caption=_latex_escape(self.caption or self.title), label=self.label or None,
            position_float="centering", multicol_align="c", convert_css=True,
            column_format="l" * self.index + "r" * (len(self.header) - self.index))
        body = _MULTIROW.sub(r"\1", body.replace("±", r"$\pm$"))  # the first row names the group: no multirow package
        body = body.replace("\\begin{tabular}", "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%\n"
                            "\\begin{tabular}").replace("\\end{tabular}", "\\end{tabular}}")
        if self.footnotes:
            notes = "\n".join(r"\item " + _latex_escape(note) for note in self.footnotes)
            body = body.replace("\\end{table}", "\\begin{minipage}{\\linewidth}\\footnotesize\\raggedright\n"
                                "\\begin{itemize}\\setlength\\itemsep{0pt}\n" + notes + "\n\\end{itemize}\n"
                                "\\end{minipage}\n\\end{table}")
        return body

    @property
    def html(self) -> str:
        table = self._styler("html").set_caption(html.escape(self.caption or self.title)).to_html()
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.footnotes)
        return (f"<h2>{html.escape(self.title)}</h2><div class=\"scroll\">{table}</div>"
                + (f"<ul class=\"notes\">{notes}</ul>" if notes else ""))


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


def _metric_columns(unique: list[Result]) -> list[tuple[str, str]]:
    """(metric name, column label) in paper order: ppl per dataset, then tasks, then the average."""
    ok = [r for r in unique if r.ok]
    datasets = sorted({name for r in ok for name in r.metrics.get("ppl", {})})
    columns = [(f"ppl/{d}", metric("ppl").label.format(arg=d)) for d in datasets]
    tasks: dict[str, str] = {}
    for r in ok:
        for task, scores in r.metrics.get("zeroshot", {}).get("tasks", {}).items():
            tasks.setdefault(task, scores["metric"])
    columns += [(f"acc/{t}", f"{t} {m}") for t, m in tasks.items()]
    if tasks:
        columns.append(("acc_avg", metric("acc_avg").label))
    return columns


def _fmt(value: float, name: str) -> str:
    return f"{value:.{metric(name).decimals}f}"


def _show(entry: pd.Series, name: str) -> str:
    """mean ± std (n) over seeds; one seed: the value, ± lm-eval's stderr where it has one."""
    if entry["n"] > 1:
        return f"{_fmt(entry['mean'], name)} ± {_fmt(entry['std'], name)} ({entry['n']})"
    if not math.isnan(entry["stderr"]):
        return f"{_fmt(entry['mean'], name)} ± {_fmt(entry['stderr'], name)}"
    return _fmt(entry["mean"], name)


def _row_keys(long: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, row label) in paper order: models as the sweep listed them, dense first, then the preset's
    method order."""
    firsts = long.groupby(["model", "row"], sort=False).agg(order=("order", "min"), method=("method", "first"))
    model_order = long.groupby("model", sort=False)["order"].min()
    keys = sorted(firsts.index, key=lambda k: (model_order[k[0]], firsts.loc[k, "method"] != "dense",
                                               firsts.loc[k, "order"]))
    return list(keys)


def results_table(unique: list[Result], long: pd.DataFrame) -> Table:
    metric_cols = _metric_columns(unique)
    sparsities = sorted({r.cell.sparsity for r in unique if r.cell.method != "dense"}) or [0.0]
    columns = [(s, m) for s in sparsities for m, _ in metric_cols]
    labels = dict(metric_cols)
    protocols = sorted(set(long["protocol_id"]))
    marked = len(protocols) > 1  # numbers of different protocols never sit side by side unmarked
    lead = ["model", "method"] + (["protocol"] if marked else [])
    header = lead + [f"{s:.0%} {labels[m]}" for s, m in columns]
    spans = [""] * len(lead) + [f"{s:.0%}" for s, _ in columns]
    agg = aggregate(long).set_index(["model", "row", "sparsity", "metric"])
    keys = _row_keys(long)
    dense = set(map(tuple, long.loc[long["method"] == "dense", ["model", "row"]].drop_duplicates().to_numpy()))

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
    if calib and result.cell.method != "dense":
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
    for result in unique:
        for warning in result.warnings:
            notes.append(f"WARNING ({result.cell.method}): {warning}")
        if result.status == "failed":
            message = (result.error.message or "").splitlines()[:1]  # one line keeps the footnote list intact
            notes.append(f"failed: {result.cell.model} {result.cell.method} {result.cell.sparsity:.0%}: "
                         f"{result.error.type}: {''.join(message)} ({result.path})")
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
    ("prefill speed-up", lambda r: _speedup(r, "speedup/prefill")),
    ("decode speed-up", lambda r: _speedup(r, "speedup/decode")),
    ("N:M speed-up", lambda r: _nm_speedup(r)),
)


def _total(timings: dict, *stages: str) -> Optional[float]:
    present = [timings[stage] for stage in stages if stage in timings]
    return sum(present) if present else None


def _pct(value) -> Optional[str]:
    return None if value is None else f"{100 * value:.1f}%"


def _num(value, pattern: str) -> Optional[str]:
    return None if value is None else pattern.format(value)


def _speedup(result: Result, name: str) -> Optional[str]:
    value = result.value(name)
    return None if value is None else metric(name).format(value)


def _nm_speedup(result: Result) -> Optional[str]:
    """N:M cells: the semi-structured kernels' speed-up where a GPU measured it; on CPU there are none."""
    if ":" not in result.cell.sparsity_type:
        return None
    value = result.metrics.get("speed", {}).get("nm_speedup")
    return "not measured (no GPU kernel on CPU)" if value is None else f"{value:.2f}x"


def details_table(unique: list[Result], labels: dict[int, str], rows_in_order: list[tuple[str, str]]) -> Optional[Table]:
    rank = {key: i for i, key in enumerate(rows_in_order)}  # the results table's row order
    ok = sorted((r for r in unique if r.ok),
                key=lambda r: (rank[(r.cell.model, labels[id(r)])], r.cell.sparsity, r.cell.seed))
    present = [(label, read) for label, read in DETAILS if any(read(r) is not None for r in ok)]
    if not present:
        return None
    seeds = len({r.cell.seed for r in ok}) > 1
    rows = [[r.cell.model, labels[id(r)], f"{r.cell.sparsity:.0%}"] + ([str(r.cell.seed)] if seeds else [])
            + [read(r) or "-" for _, read in present] for r in ok]
    notes = ["peak memory: CUDA max allocated when on a GPU, else the process's max RSS"]
    return Table("Details per cell", ["model", "method", "sparsity"] + (["seed"] if seeds else [])
                 + [label for label, _ in present], rows, notes, caption="Details of every cell",
                 label="tab:prunebench-details", index=3 + seeds)


# --- reported vs reproduced ----------------------------------------------------------------------

def _target_groups(target: dict, unique: list[Result], labels: dict[int, str]) -> dict[str, list[Result]]:
    """{row label: its cells (one per seed)} of the rows a target is about."""
    groups: dict[str, list[Result]] = {}
    for r in unique:
        if r.cell.model == target["model"] and r.cell.method == target["method"] \
                and (r.cell.method == "dense" or math.isclose(r.cell.sparsity, float(target["sparsity"]))):
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
    rows = []
    for target in targets:
        name, reported, tolerance = target["metric"], float(target["reported"]), float(target["tolerance"])
        unit = target.get("unit", "relative")
        if metric(name).unit == "%" and reported <= 1.0:
            reported *= 100  # accuracies are compared in %
        allowed = f"±{tolerance:.0%}" if unit == "relative" else f"±{tolerance:g} pts"
        groups = _target_groups(target, unique, labels) or {target["method"]: []}
        for label, cells in groups.items():
            ok = [r for r in cells if r.ok and r.value(name) is not None]
            first = next(iter(sorted(cells, key=lambda r: not r.ok)), None)
            if not ok:
                judged = f"not run: {name} not evaluated" if first is not None and first.ok else _not_run(first)
                text, diff, band, differs = "-", "-", "-", "-"
            else:
                values = [r.value(name) for r in ok]
                ours = sum(values) / len(values)
                text = _fmt(ours, name) + (f" ± {_fmt(pd.Series(values).std(), name)} ({len(values)})"
                                           if len(values) > 1 else "")
                diff = f"{ours - reported:+.2f} ({(ours - reported) / abs(reported):+.1%})"
                judged, band = verdict(ours, reported, tolerance, name, unit), seed_band(values, reported)
                differs = _differences(ok[0], target)
            rows.append([target["model"], label, f"{float(target['sparsity']):.0%}", name, text,
                         _fmt(reported, name), diff, allowed, judged, band, differs, str(target.get("source", ""))])
    notes = sorted({f"{t['model']} {t['method']} {t['metric']}: {t['note']}" for t in targets if t.get("note")})
    notes.append("seed band: the paper's number lies inside our mean ± 2 sample std over seeds (two or more seeds)")
    return Table("Reported vs reproduced", ["model", "method", "sparsity", "metric", "ours", "paper", "difference",
                                            "tolerance", "verdict", "seed band", "protocol differences", "source"],
                 rows, notes, caption="Reported vs reproduced", label="tab:prunebench-targets", index=4)


# --- entry point ---------------------------------------------------------------------------------

def build_report(results: list[Result], corrupt: list[tuple[str, str]] = (), sweep_dir: Optional[Path] = None) -> Report:
    unique = unique_results(results)
    long = long_frame(unique, sweep_dir)
    labels = row_labels(unique)
    table = results_table(unique, long)
    table.footnotes = _seed_note(long) + _footnotes(unique, list(corrupt))
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
    return report


def _wide(report: Report) -> str:
    """The results table with raw numbers: mean, std and n of every (row, sparsity, metric)."""
    agg = aggregate(report.long)
    wide = agg.pivot_table(index=["model", "row"], columns=["sparsity", "metric"], values=["mean", "std", "n"],
                           sort=False).astype({("n",) + key: "Int64" for key in agg.groupby(["sparsity", "metric"]).groups})
    stats = ["mean", "std", "n"]
    wide = wide[sorted(wide.columns, key=lambda c: (c[1], list(agg["metric"].unique()).index(c[2]), stats.index(c[0])))]
    wide.columns = [f"{s:.0%} {m} {stat}" for stat, s, m in wide.columns]
    return wide.reset_index().to_csv(index=False)


def _write(report: Report, sweep_dir: Path, fmt: str, images: list[Path]) -> list[Path]:
    if fmt == "md":
        paths = {sweep_dir / "table.md": report.markdown + "\n"}
    elif fmt == "csv":
        paths = {sweep_dir / ("table.csv" if t is report.results else f"table_{t.title.split()[0].lower()}.csv"): t.csv
                 for t in report.tables}
        paths[sweep_dir / "table_wide.csv"] = _wide(report)
    elif fmt == "tex":
        paths = {sweep_dir / "table.tex": "% \\usepackage{booktabs,graphicx}\n"
                 + "\n\n".join(t.latex for t in report.tables) + "\n"}
    else:
        paths = {sweep_dir / "report.html": render(report, f"prunebench report: {sweep_dir.name}", images)}
    for path, text in paths.items():
        path.write_text(text)
    return list(paths)
