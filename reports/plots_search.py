"""The fitness of rate searches per generation.

    python -m reports.plots_search OUT_STEM result.json [result.json ...]

Each result.json is a cell whose allocator recorded `allocator.search` (methods/allocators/self_pruner.py);
several results (e.g. LLM operators vs the classical GA) share one axis, with the uniform-rates fitness as a
dotted reference line. Per-block schedules are plotted by `python -m reports collect` (reports/plots.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from bench.core.records import read_result
from reports.select import method_label

matplotlib.use("Agg")


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
    if len(args) < 2:
        sys.exit(__doc__)
    for written in plot_search(args[1:], args[0]):
        print(written)
