"""Collect the result JSONs under a sweep dir into paper-style tables (markdown, CSV, LaTeX, HTML).

- Results table (the papers' layout): rows = model x method, dense baseline first; columns = sparsity x
  metric (perplexity per dataset, zero-shot accuracy per task in %, their average). The best pruned
  value per column and model is bold (lower ppl, higher accuracy); the dense row is the reference.
- Details table, one row per cell, with the columns that any result has: measured sparsity, parameters
  removed, pruning time, peak memory, speed-up.
- Targets table, for `experiment=` presets: each `targets:` entry of the cells' resolved configs with
  ours, the paper's number, the difference and a verdict.

A cell that failed shows "failed", one never run shows "-": a number only ever comes from a result file.
Footnotes give each protocol and every fallback warning and failure, and every file under the sweep that
is not a readable record. Records come from `bench.core.records` (the one reader); what a metric means
(direction, unit, label) from its registry.
"""
from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench.core.records import Result, metric, read_results
from reports.html import render
from reports.plots import write_plots
from reports.select import method_label, unique_results

FORMATS = ("md", "csv", "tex", "html")


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    footnotes: list[str] = field(default_factory=list)
    bold: set = field(default_factory=set)  # (row index, column index) of the best value per column

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
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buffer.getvalue()

    @property
    def latex(self) -> str:
        def esc(text: str) -> str:
            for char in "&%_#$":
                text = text.replace(char, "\\" + char)
            return text.replace("±", r"$\pm$")

        lines = [r"\begin{tabular}{ll" + "r" * (len(self.header) - 2) + "}", r"\toprule",
                 " & ".join(esc(h) for h in self.header) + r" \\", r"\midrule"]
        body = [[esc(t) for t in row] for row in self.rows]
        lines += [" & ".join(r"\textbf{" + t + "}" if (r, c) in self.bold else t for c, t in enumerate(row))
                  + r" \\" for r, row in enumerate(body)]
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [f"% {note}" for note in self.footnotes]
        return "\n".join(lines)

    @property
    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(t) if (r, c) not in self.bold else f'<b>{html.escape(t)}</b>'}</td>"
                                        for c, t in enumerate(row)) + "</tr>" for r, row in enumerate(self.rows))
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.footnotes)
        return (f"<h2>{html.escape(self.title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
                f"</table>" + (f"<ul class=\"notes\">{notes}</ul>" if notes else ""))


@dataclass
class Report:
    """Everything `collect` produces; `markdown` is the results table followed by the others."""

    results: Table
    details: Optional[Table]
    targets: Optional[Table]
    records: list[Result]  # the deduplicated results, for plots and W&B
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


def results_table(unique: list[Result]) -> Table:
    metric_cols = _metric_columns(unique)
    sparsities = sorted({r.cell.sparsity for r in unique if r.cell.method != "dense"}) or [0.0]
    columns = [(s, m) for s in sparsities for m, _ in metric_cols]
    labels = dict(metric_cols)
    header = ["model", "method"] + [f"{s:.0%} {labels[m]}" for s, m in columns]

    entries: dict[tuple, dict] = {}
    values: dict[tuple, dict] = {}
    for result in unique:
        cell = result.cell
        row_key = (cell.model, method_label(cell))
        row, numbers = entries.setdefault(row_key, {}), values.setdefault(row_key, {})
        for col in columns:
            sparsity, name = col
            if cell.method != "dense" and cell.sparsity != sparsity:
                continue
            if result.ok:
                value = result.value(name)
                if value is not None:
                    row[col], numbers[col] = _fmt(value, name), value
            else:
                row.setdefault(col, "failed" if result.status == "failed" else "running")

    keys = sorted(entries, key=lambda k: (k[0], k[1] != "dense", k[1]))
    rows = [[model, label] + [entries[(model, label)].get(col, "-") for col in columns] for model, label in keys]
    bold = set()
    for c, col in enumerate(columns):
        for model in {k[0] for k in keys}:
            candidates = [(values[k][col], r) for r, k in enumerate(keys)
                          if k[0] == model and k[1] != "dense" and col in values[k]]
            if len(candidates) > 1:
                best = (min if metric(col[1]).lower_is_better else max)(v for v, _ in candidates)
                bold |= {(r, c + 2) for v, r in candidates if v == best}
    return Table("Results", header, rows, bold=bold)


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
    ("pruning time (s)", lambda r: _num(r.timings.get("prune"), "{:.1f}")),
    ("peak memory (MB)", lambda r: _num(r.peak_memory.get("cuda_mb", r.peak_memory.get("rss_mb")), "{:.0f}")),
    ("prefill speed-up", lambda r: _speedup(r, "speedup/prefill")),
    ("decode speed-up", lambda r: _speedup(r, "speedup/decode")),
)


def _pct(value) -> Optional[str]:
    return None if value is None else f"{100 * value:.1f}%"


def _num(value, pattern: str) -> Optional[str]:
    return None if value is None else pattern.format(value)


def _speedup(result: Result, name: str) -> Optional[str]:
    value = result.value(name)
    return None if value is None else metric(name).format(value)


def details_table(unique: list[Result]) -> Optional[Table]:
    ok = sorted((r for r in unique if r.ok),
                key=lambda r: (r.cell.model, r.cell.method != "dense", method_label(r.cell), r.cell.sparsity))
    present = [(label, read) for label, read in DETAILS if any(read(r) is not None for r in ok)]
    if not present:
        return None
    rows = [[r.cell.model, method_label(r.cell), f"{r.cell.sparsity:.0%}"]
            + [read(r) or "-" for _, read in present] for r in ok]
    notes = ["peak memory: CUDA max allocated when on a GPU, else the process's max RSS"]
    return Table("Details per cell", ["model", "method", "sparsity"] + [label for label, _ in present], rows, notes)


# --- reported vs reproduced ----------------------------------------------------------------------

def _target_result(target: dict, unique: list[Result]) -> Optional[Result]:
    matches = [r for r in unique if r.cell.model == target["model"] and r.cell.method == target["method"]
               and (r.cell.method == "dense" or math.isclose(r.cell.sparsity, float(target["sparsity"])))]
    matches.sort(key=lambda r: not r.ok)
    return matches[0] if matches else None


def verdict(ours: float, reported: float, tolerance: float, name: str) -> str:
    relative = (ours - reported) / abs(reported)
    if abs(relative) <= tolerance:
        return "within tolerance"
    improved = relative < 0 if metric(name).lower_is_better else relative > 0
    return "better" if improved else "worse"


def _not_run(result: Optional[Result]) -> str:
    if result is None:
        return "not run: no result in this sweep"
    if result.status == "failed":
        if "load" not in result.timings:  # the model never loaded
            return "not run: weights unavailable"
        return f"not run: failed ({result.error.type})"
    return f"not run: {result.status}"


def targets_table(unique: list[Result]) -> Optional[Table]:
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
        if metric(name).unit == "%" and reported <= 1.0:
            reported *= 100  # accuracies are compared in %
        result = _target_result(target, unique)
        ours = result.value(name) if result is not None and result.ok else None
        if result is None or not result.ok:
            text, diff, judged = "-", "-", _not_run(result)
        elif ours is None:
            text, diff, judged = "-", "-", f"not run: {name} not evaluated"
        else:
            text = _fmt(ours, name)
            diff = f"{ours - reported:+.2f} ({(ours - reported) / abs(reported):+.1%})"
            judged = verdict(ours, reported, tolerance, name)
        rows.append([target["model"], target["method"], f"{float(target['sparsity']):.0%}", name, text,
                     _fmt(reported, name), diff, f"±{tolerance:.0%}", judged, str(target.get("source", ""))])
    notes = sorted({f"{t['model']} {t['method']} {t['metric']}: {t['note']}" for t in targets if t.get("note")})
    return Table("Reported vs reproduced", ["model", "method", "sparsity", "metric", "ours", "paper", "difference",
                                            "tolerance", "verdict", "source"], rows, notes)


# --- entry point ---------------------------------------------------------------------------------

def build_report(results: list[Result], corrupt: list[tuple[str, str]] = ()) -> Report:
    unique = unique_results(results)
    table = results_table(unique)
    table.footnotes = _footnotes(unique, list(corrupt))
    return Report(table, details_table(unique), targets_table(unique), unique)


def collect(sweep_dir: Path, write: bool = True, formats: tuple = ("md", "csv"), plots: bool = False) -> Report:
    """Read every result.json under `sweep_dir`; write table.<fmt>, report.html and plots/ there."""
    sweep_dir = Path(sweep_dir)
    found = read_results(sweep_dir)
    if not found.records:
        raise FileNotFoundError(f"no result.json under {sweep_dir}"
                                + (f" ({len(found.corrupt)} unreadable)" if found.corrupt else ""))
    report = build_report(found.records, found.corrupt)
    if write:
        images = []
        if plots:
            images = write_plots(report.records, sweep_dir / "plots")
        for fmt in formats:
            report.written += _write(report, sweep_dir, fmt, [p for p in images if p.suffix == ".png"])
        report.written += images
    return report


def _write(report: Report, sweep_dir: Path, fmt: str, images: list[Path]) -> list[Path]:
    if fmt == "md":
        paths = {sweep_dir / "table.md": report.markdown + "\n"}
    elif fmt == "csv":
        paths = {sweep_dir / ("table.csv" if t is report.results else f"table_{t.title.split()[0].lower()}.csv"): t.csv
                 for t in report.tables}
    elif fmt == "tex":
        paths = {sweep_dir / "table.tex": "\n\n".join(t.latex for t in report.tables) + "\n"}
    else:
        paths = {sweep_dir / "report.html": render(report, f"prunebench report: {sweep_dir.name}", images)}
    for path, text in paths.items():
        path.write_text(text)
    return list(paths)
