"""Plots of a rate search (Self-Pruner): best and mean fitness per generation, one line pair per result.

    python -m reports.plots_search OUT_STEM result.json [result.json ...]   # writes OUT_STEM.png/.svg

Each result.json is a cell whose allocator recorded `allocator.search` (methods/allocators/self_pruner.py);
several results (e.g. LLM operators vs the classical GA) share one axis, with the uniform-rates fitness
as a dotted reference line.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from bench.core.records import read_result

matplotlib.use("Agg")


def plot_search(results: list, out_stem) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, path in enumerate(results):
        result = read_result(Path(path))
        search = result.allocator["search"]
        label = f"{result.cell.method} ({search['operators']}) {result.cell.sparsity:g}"
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
    fig.tight_layout()
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    files = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    for file in files:
        fig.savefig(file, dpi=120)
    plt.close(fig)
    return files


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for written in plot_search(sys.argv[2:], sys.argv[1]):
        print(written)
