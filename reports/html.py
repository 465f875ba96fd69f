"""One self-contained HTML report: the tables (pandas' Styler), the plots (PNG embedded as data URIs,
each with a caption), and a provenance footer (git commit, versions, hardware, when); no external files,
scripts or fonts, so it can be mailed or attached to a review as is."""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 100%; }
div.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 0.5em; font-size: 0.9em; }
caption { caption-side: top; text-align: left; font-style: italic; padding: 0.3em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; white-space: nowrap;
         font-variant-numeric: tabular-nums; }
th { background: #eee; text-align: center; }
th.row_heading, th.index_name { text-align: left; background: #f6f6f6; }
ul.notes { font-size: 0.85em; color: #555; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 48%; }
figcaption { font-size: 0.85em; color: #444; }
img { max-width: 100%; }
footer { margin-top: 2em; font-size: 0.8em; color: #666; border-top: 1px solid #ccc; }
"""

CAPTIONS = {  # figure stem prefix -> what it shows
    "ppl_vs_sparsity": "Perplexity vs sparsity (log scale); error bars: one sample std over seeds; dashed: dense",
    "accuracy_vs_sparsity": "Mean zero-shot accuracy vs sparsity; error bars: one sample std over seeds; dashed: dense",
    "speedup_vs_params": "Measured speed-up over the dense model vs parameters removed",
    "layer_schedules": "Allocated sparsity per decoder block, one row per method; red: the target",
}


def caption(stem: str) -> str:
    for prefix, text in CAPTIONS.items():
        if stem.startswith(prefix):
            what = stem[len(prefix):].strip("_").replace("_", ", ")
            return f"{text}{f' ({what})' if what else ''}."
    return stem


def provenance_footer(records) -> str:
    """Git commits, package versions and machines of the records, and when this report was written."""
    commits, machines, packages = set(), set(), {}
    for record in records:
        info = record.provenance
        git = info.get("git", {})
        if git.get("commit"):
            commits.add(git["commit"][:12] + (" (dirty)" if git.get("dirty") else ""))
        hardware = info.get("hardware")
        machines.add(", ".join(f"{k} {v}" for k, v in hardware.items()) if isinstance(hardware, dict)
                     else info.get("platform", "unknown platform"))
        for name, version in info.get("packages", {}).items():
            packages.setdefault(name, set()).add(str(version))
    lines = [f"git commit: {', '.join(sorted(commits)) or 'unknown'}",
             "versions: " + ("; ".join(f"{n} {', '.join(sorted(v))}" for n, v in sorted(packages.items())) or "unknown"),
             f"hardware: {'; '.join(sorted(machines)) or 'unknown'}",
             f"report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(records)} result records"]
    return "<footer>" + "".join(f"<p>{html.escape(line)}</p>" for line in lines) + "</footer>"


def render(report, title: str, images: list[Path]) -> str:
    figures = "".join(
        f"<figure><img alt=\"{html.escape(caption(p.stem))}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}\"><figcaption>{html.escape(caption(p.stem))} "
        f"(also {html.escape(p.stem)}.pdf and .svg in plots/)</figcaption></figure>"
        for p in images)
    tables = "".join(t.html for t in report.tables)
    plots = f"<h2>Plots</h2>{figures}" if figures else ""
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{tables}{plots}"
            f"{provenance_footer(report.records)}</body></html>\n")
