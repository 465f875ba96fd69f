"""Collect the result JSONs under a sweep dir into a paper-style table (markdown + CSV).

Rows are model x method (dense first), columns sparsity x dataset. A cell that failed shows
"failed", one never run shows "-": a number only ever comes from a result file.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from bench.results import read_results


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    footnotes: list[str]

    @property
    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
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


def _method_label(result: dict) -> str:
    cell = result["cell"]
    kind = cell.get("sparsity_type", "unstructured")
    label = cell["method"] if kind == "unstructured" or cell["method"] == "dense" else f"{cell['method']} ({kind})"
    wbits = result.get("config", {}).get("method", {}).get("wbits")
    return label if wbits is None else f"{label} + {wbits}-bit"  # a quantized run is its own row


def _protocol_note(result: dict) -> str:
    calib = result.get("data", {}).get("calib", {})
    evals = result.get("data", {}).get("eval", {})
    parts = [f"protocol `{result['cell']['protocol']}`"]
    if calib and result["cell"]["method"] != "dense":
        parts.append(f"calibration {calib['dataset']}/{calib['split']} {calib['nsamples']} x {calib['seqlen']} tokens")
    for name, info in evals.items():
        parts.append(f"{name}: {info['dataset']}/{info['split']}, {info['windows']} windows x {info['seqlen']} tokens")
    return "; ".join(parts)


def build_table(results: list[dict]) -> Table:
    by_hash = {}
    for result in results:  # one entry per distinct config; a finished run wins over a failed one
        key = result.get("config_hash")
        if key not in by_hash or result.get("status") == "ok":
            by_hash[key] = result
    unique = list(by_hash.values())
    datasets = sorted({name for r in unique for name in r.get("metrics", {}).get("ppl", {})})
    sparsities = sorted({r["cell"]["sparsity"] for r in unique if r["cell"]["method"] != "dense"})
    if not sparsities:
        sparsities = [0.0]
    columns = [(s, d) for s in sparsities for d in datasets]
    header = ["model", "method"] + [f"{s:.0%} {d} ppl" for s, d in columns]

    rows_by_key: dict[tuple, dict] = {}
    for result in unique:
        cell = result["cell"]
        row_key = (cell["model"], _method_label(result))
        entries = rows_by_key.setdefault(row_key, {})
        for sparsity, dataset in columns:
            if cell["method"] != "dense" and cell["sparsity"] != sparsity:
                continue
            if result.get("status") == "ok":
                value = result["metrics"].get("ppl", {}).get(dataset)
                if value is not None:
                    entries[(sparsity, dataset)] = f"{value:.2f}"
            elif result.get("status") == "failed":
                entries.setdefault((sparsity, dataset), "failed")
            else:
                entries.setdefault((sparsity, dataset), "running")

    def order(key: tuple) -> tuple:
        return (key[0], key[1] != "dense", key[1])

    rows = [[model, label] + [rows_by_key[(model, label)].get(col, "-") for col in columns]
            for model, label in sorted(rows_by_key, key=order)]
    footnotes = sorted({_protocol_note(r) for r in unique if r.get("status") == "ok"})
    for result in unique:
        for warning in result.get("warnings", []):
            footnotes.append(f"WARNING ({result['cell']['method']}): {warning}")
        if result.get("status") == "failed":
            error = result["error"]
            footnotes.append(f"failed: {result['cell']['model']} {result['cell']['method']} "
                             f"{result['cell']['sparsity']:.0%}: {error['type']}: {error['message']} ({result['path']})")
    return Table(header, rows, list(dict.fromkeys(footnotes)))


def collect(sweep_dir: Path, write: bool = True) -> Table:
    sweep_dir = Path(sweep_dir)
    results = read_results(sweep_dir)
    if not results:
        raise FileNotFoundError(f"no result.json under {sweep_dir}")
    table = build_table(results)
    if write:
        (sweep_dir / "table.md").write_text(table.markdown + "\n")
        (sweep_dir / "table.csv").write_text(table.csv)
    return table
