"""A table as strings (`Table`), and how a metric's value is written in one."""
from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass, field, replace
from typing import Optional

import pandas as pd

from bench.core.metrics import metric


def percent(value: float, among=()) -> str:
    """`value` (a fraction) as a percentage with the fewest decimals that tell it apart from every other
    value of `among` and never round a value strictly between 0 and 1 to 0% or 100%: a sparsity of
    0.999999 is not a dense-free model, and 0.5 and 0.501 are different cells."""
    for decimals in range(17):
        text = f"{value:.{decimals}%}"
        honest = value <= 0 or value >= 1 or 0 < float(text[:-1]) < 100
        if honest and all(f"{other:.{decimals}%}" != text for other in among if other != value):
            return text
    return f"{100 * value!r}%"


def fmt(value: float, name: str) -> str:
    """`value` of metric `name` with the registry's decimals."""
    return f"{value:.{metric(name).decimals}f}"


def _latex_escape(text: str) -> str:
    # a blank line in a name (method.display) is a paragraph break: inside a tabular, a broken document; the
    # backslash waits as NUL (control characters are gone) so its own braces are not escaped below
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).replace("\\", "\x00")
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    text = text.replace("\x00", r"\textbackslash{}")
    text = text.replace("~", r"\textasciitilde{}").replace("^", r"\^{}").replace("±", r"$\pm$")
    text = _SPREAD.sub(r"\\,{\\scriptsize$\\pm$\1}", text)  # a spread in small type keeps columns narrow
    return _CODE.sub(r"\\texttt{\1}", text)  # `quick` is a name in code type, not quotes


# Body rows of one LaTeX float: more run off an article page at \footnotesize (54 rows overflowed it by 53pt)
PAGE_ROWS = 40
_CODE = re.compile(r"`([^`]*)`")
_SPREAD = re.compile(r"(?<=\d) \$\\pm\$ (\d[\d.]*)")


def _size(columns: int) -> str:
    """Smaller type for wider tables, never below what a paper's appendix prints (scriptsize)."""
    return r"\small" if columns <= 6 else r"\footnotesize" if columns <= 10 else r"\scriptsize"


def _stacked(label: str) -> str:
    """A long column label on two lines, so the label does not set the column's width."""
    words = label.split(" ")
    if len(label) <= 10 or len(words) < 2:
        return _latex_escape(label)
    cut = min(range(1, len(words)), key=lambda i: abs(len(" ".join(words[:i])) - len(" ".join(words[i:]))))
    lines = (_latex_escape(" ".join(words[:cut])), _latex_escape(" ".join(words[cut:])))
    return r"\begin{tabular}[b]{@{}c@{}}" + lines[0] + r"\\" + lines[1] + r"\end{tabular}"


def _header_rows(levels: list[list[str]]) -> list[str]:
    """One LaTeX header row per level: a label spanning the columns that share it and every level above
    (`\\multicolumn`), ruled by a `\\cmidrule` over them; the last level is one label per column."""
    rows, width = [], len(levels[-1])
    for depth, level in enumerate(levels):
        keys = [tuple(above[c] for above in levels[:depth + 1]) for c in range(width)]
        cells, rules, start = [], [], 0
        while start < width:
            end = start
            while depth < len(levels) - 1 and end + 1 < width and keys[end + 1] == keys[start]:
                end += 1
            text = _latex_escape(level[start]) if depth < len(levels) - 1 else _stacked(level[start])
            cells.append(text if end == start else rf"\multicolumn{{{end - start + 1}}}{{c}}{{{text}}}")
            if depth < len(levels) - 1 and text:
                rules.append(rf"\cmidrule(lr){{{start + 1}-{end + 1}}}")
            start = end + 1
        rows.append(" & ".join(cells) + r" \\" + (" " + " ".join(rules) if rules else ""))
    return rows


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


_NUMBER_LIKE = re.compile(r"^([-+±]?\d|[-+]?\.\d|-$|failed$|running$|not measured)")


@dataclass
class Table:
    """A table as strings, written as markdown (flat header), CSV, LaTeX (booktabs, caption, label,
    notes) and, through pandas' Styler, HTML. `spans`, when set, is the top header level of every
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
    groups: dict = field(default_factory=dict)  # LaTeX: {row index: heading of the row group it starts}
    levels: Optional[list] = None  # LaTeX: every header level, top first (else `spans` over `header`)
    dense: bool = False  # LaTeX: the smallest type and spacing, for a table of many text columns
    sections: bool = False  # LaTeX: the first column's values head row groups instead of filling a column
    paper: Optional["Table"] = None  # LaTeX: the layout a paper prints, written in this table's place

    def _cells(self, wrap, escape=lambda text: text) -> list[list[str]]:
        return [[wrap(escape(text)) if (r, c) in self.bold else escape(text) for c, text in enumerate(row)]
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
        """A booktabs float (`\\usepackage{booktabs}`): one header row per level, each span ruled by a
        `\\cmidrule`, row groups under an italic heading, notes below. Never shrunk: a table scaled to the
        line width prints its numbers too small to read."""
        if self.paper is not None:
            return self.paper.latex
        if self.sections and len(self.rows) > PAGE_ROWS:
            return "\n\n".join(part.latex for part in self._pages())
        if self.sections:
            starts = {r: row[0] for r, row in enumerate(self.rows) if r == 0 or self.rows[r - 1][0] != row[0]}
            return replace(self, header=self.header[1:], rows=[row[1:] for row in self.rows], groups=starts,
                           bold={(r, c - 1) for r, c in self.bold if c}, spans=self.spans and self.spans[1:],
                           levels=self.levels and [level[1:] for level in self.levels], index=self.index - 1,
                           sections=False).latex
        leaves = [head[len(span):].strip() for span, head in zip(self.spans, self.header)] if self.spans else []
        levels = self.levels or ([self.spans, leaves] if self.spans else [self.header])
        text = [c for c in range(self.index, len(self.header))
                if any(not _NUMBER_LIKE.match(row[c]) for row in self.rows)]
        align = "".join("l" if c < self.index else "p{1.8cm}" if c in text else "r" for c in range(len(self.header)))
        width = 11 if self.dense else len(self.header)
        lines = [r"\begin{table}[htbp]", r"\centering", _size(width),
                 r"\caption{" + _latex_escape(self.caption or self.title) + "}"]
        lines += [r"\label{" + self.label + "}"] if self.label else []
        lines += [rf"\setlength{{\tabcolsep}}{{{4 if width <= 10 else 3}pt}}"] if width > 6 else []
        lines += [r"\begin{tabular}{" + align + "}", r"\toprule", *_header_rows(levels), r"\midrule"]
        previous: list[str] = []
        for r, row in enumerate(self._cells(lambda t: r"\textbf{" + t + "}", _latex_escape)):
            if r in self.groups:
                lines += ([r"\midrule"] if r else []) + [rf"\multicolumn{{{len(row)}}}{{l}}{{\emph{{"
                                                          + _latex_escape(self.groups[r]) + r"}} \\"]
                previous = []
            # a leading column repeats its value only where the one before it changes (the row's group)
            shown = list(row)
            for c in range(self.index - 1):
                if previous[:c + 1] == row[:c + 1]:
                    shown[c] = ""
            previous = row
            for c in text:  # ragged, not justified over a narrow column; the last cell's \\ must stay the row's
                if shown[c] and c < len(shown) - 1:
                    shown[c] = r"\raggedright " + shown[c]
            lines.append(" & ".join(shown) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        if self.footnotes:
            lines += [r"\par\smallskip\footnotesize\raggedright"]
            lines += [_latex_escape(note) + r"\par" for note in self.footnotes]
        return "\n".join(lines + [r"\end{table}"])

    def _pages(self) -> list["Table"]:
        """A sectioned table too long for a page as floats of at most PAGE_ROWS rows each: whole sections
        packed together where they fit, a longer section cut (its heading repeated); the caption says
        "continued", the notes come once, under the last."""
        starts = [r for r in range(len(self.rows)) if r == 0 or self.rows[r - 1][0] != self.rows[r][0]]
        pieces = [list(range(start, end))[i:i + PAGE_ROWS] for start, end in zip(starts, starts[1:] + [len(self.rows)])
                  for i in range(0, end - start, PAGE_ROWS)]
        pages: list[list[int]] = []
        for piece in pieces:
            if pages and len(pages[-1]) + len(piece) <= PAGE_ROWS:
                pages[-1] += piece
            else:
                pages.append(piece)
        return [replace(self, rows=[self.rows[r] for r in page], bold={(page.index(r), c) for r, c in self.bold
                                                                        if r in page},
                        footnotes=self.footnotes if i == len(pages) - 1 else [],
                        caption=(self.caption or self.title) + (" (continued)" if i else ""),
                        label=self.label if i == 0 else "") for i, page in enumerate(pages)]

    @property
    def html(self) -> str:
        table = self._styler("html").set_caption(html.escape(self.caption or self.title)).to_html()
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.footnotes)
        return (f"<h2>{html.escape(self.title)}</h2><div class=\"scroll\">{table}</div>"
                + (f"<ul class=\"notes\">{notes}</ul>" if notes else ""))

