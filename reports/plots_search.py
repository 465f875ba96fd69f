"""Plots of rate searches and schedules.

    python -m reports.plots_search OUT_STEM result.json [result.json ...]      # fitness per generation
    python -m reports.plots_search --schedules OUT_STEM <sweep dir or result.json> ...   # per-block rates

Search: each result.json is a cell whose allocator recorded `allocator.search`
(methods/allocators/self_pruner.py); several results (e.g. LLM operators vs the classical GA) share one
axis, with the uniform-rates fitness as a dotted reference line.
Schedules: the allocated sparsity per decoder block of every ok result found, side by side (one line per
cell, e.g. the allocator league's uniform, OWL, loss-estimate, GA and LLM schedules). A block's value is
the plain mean over its linears: exact for block-level allocators (uniform, OWL, the searches), a summary
for per-linear ones (loss-estimate).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from bench.core.records import read_result, read_results
from reports.select import method_label

matplotlib.use("Agg")


def block_schedule(allocated: dict[str, float]) -> list[float]:
    """Mean allocated rate per decoder block, in block order (a linear's block: the first index in its name)."""
    blocks: dict[int, list[float]] = {}
    for name, rate in allocated.items():
        index = re.search(r"\.(\d+)\.", name)
        if index:
            blocks.setdefault(int(index.group(1)), []).append(rate)
    return [sum(rates) / len(rates) for _, rates in sorted(blocks.items())]


def plot_schedules(sources: list, out_stem) -> list[Path]:
    records = []
    for source in map(Path, sources):
        records += read_results(source).records if source.is_dir() else [read_result(source)]
    records = sorted((r for r in records if r.ok and r.sparsity.get("allocated")),
                     key=lambda r: (r.cell.method, r.cell.seed))
    if not records:
        raise SystemExit(f"no ok result with an allocated schedule under {', '.join(map(str, sources))}")
    fig, ax = plt.subplots(figsize=(8, 4))
    for index, result in enumerate(records):
        schedule = block_schedule(result.sparsity["allocated"])
        ax.plot(range(len(schedule)), schedule, "-o", markersize=3, color=f"C{index % 10}",
                label=f"{method_label(result.cell)} seed {result.cell.seed}")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity (mean over the block's linears)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{records[0].cell.model}, target {records[0].cell.sparsity:g}", fontsize=9)
    return _save(fig, out_stem)


def plot_search(results: list, out_stem) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, path in enumerate(results):
        result = read_result(Path(path))
        search = result.allocator["search"]
        label = f"{method_label(result.cell)} ({search['operators']}) {result.cell.sparsity:g}"
        color = f"C{index}"
        generations = [h["generation"] for h in search["history"]]
        ax.plot(generations, [h["best"] for h in search["history"]], "-o", color=color, label=f"{label} best")
        ax.plot(generations, [h["mean"] for h in search["history"]], "--", color=color, label=f"{label} mean")
        ax.axhline(search["uniform_fitness"], color=color, linestyle=":", linewidth=1,
                   label=f"{label} uniform rates")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (held-out calibration ppl)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return _save(fig, out_stem)


def _save(fig, out_stem) -> list[Path]:
    fig.tight_layout()
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    files = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    for file in files:
        fig.savefig(file, dpi=120)
    plt.close(fig)
    return files


if __name__ == "__main__":
    args = sys.argv[1:]
    plot = plot_schedules if args[:1] == ["--schedules"] else plot_search
    args = args[1:] if plot is plot_schedules else args
    if len(args) < 2:
        sys.exit(__doc__)
    for written in plot(args[1:], args[0]):
        print(written)
