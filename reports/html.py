"""One self-contained HTML report: the tables and the plots (PNG embedded as data URIs), no external
files, scripts or fonts, so it can be mailed or attached to a review as is."""
from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #eee; }
td:nth-child(-n+2), th:nth-child(-n+2) { text-align: left; }
ul.notes { font-size: 0.85em; color: #555; }
td:last-child { white-space: normal; text-align: left; }
figure { display: inline-block; margin: 0.5em; }
img { max-width: 100%; }
"""


def render(report, title: str, images: list[Path]) -> str:
    figures = "".join(
        f"<figure><img alt=\"{html.escape(p.stem)}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}\"><figcaption>{html.escape(p.stem)}</figcaption></figure>"
        for p in images)
    tables = "".join(t.html for t in report.tables)
    plots = f"<h2>Plots</h2>{figures}" if figures else ""
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{tables}{plots}</body></html>\n")
