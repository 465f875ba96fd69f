"""A table as strings (`Table`), and how a metric's value is written in one."""
from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from bench.core.metrics import metric


def fmt(value: float, name: str) -> str:
    """`value` of metric `name` with the registry's decimals."""
    return f"{value:.{metric(name).decimals}f}"


def _latex_escape(text: str) -> str:
    text = text.replace("\\", r"\textbackslash{}")
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text.replace("~", r"\textasciitilde{}").replace("^", r"\^{}").replace("±", r"$\pm$")


def _md_escape(text: str) -> str:
    """One markdown table cell: a `|` or a line break in a name (method.display, a model name) would end
    the cell or the row and forge another."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text.replace("|", "\\|"))


_CSV_FORMULA = re.compile(r"^[=+\-@\t\r]")
_CSV_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?( ± [\d.]+)?( \(\d+\))?$")


def csv_escape(value):
    """A CSV cell a spreadsheet will not run: text starting with = + - @ tab or CR gets a leading quote
    (OWASP's CSV injection advice); numbers, written or parsed, stay as they are."""
    if isinstance(value, str) and _CSV_FORMULA.match(value) and not _CSV_NUMBER.match(value):
        return "'" + value
    return value


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
        lines = ["| " + " | ".join(map(_md_escape, self.header)) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(map(_md_escape, row)) + " |" for row in self._cells(lambda t: f"**{t}**")]
        if self.footnotes:
            lines.append("")
            lines += [f"- {_md_escape(note)}" for note in self.footnotes]
        return "\n".join(lines)

    @property
    def csv(self) -> str:
        if self.data is not None:
            return self.data.map(csv_escape).rename(columns=csv_escape).to_csv(index=False)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(map(csv_escape, self.header))
        writer.writerows([map(csv_escape, row) for row in self.rows])
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

