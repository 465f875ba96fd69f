"""Plots of a sweep's results (matplotlib, each figure written as PNG and SVG).

Every function takes the deduplicated result dicts (`reports.collect.unique_results`) and an output
dir, writes its figures and returns their paths; a function with nothing to plot writes nothing.
The dense baseline is drawn as a dashed horizontal line, since it has no sparsity axis.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from reports.collect import method_label, metric_value  # noqa: E402

# Reproducible SVGs: no timestamp, fixed element ids
matplotlib.rcParams["svg.hashsalt"] = "prunebench"


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return paths


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok"]


def _series(records: list[dict], model: str, metric: str) -> tuple[dict, dict]:
    """({method: [(sparsity %, value)]}, {method: dense value}) of one model's metric."""
    lines, dense = defaultdict(list), {}
    for r in records:
        value = metric_value(r, metric)
        if r["cell"]["model"] != model or value is None:
            continue
        if r["cell"]["method"] == "dense":
            dense["dense"] = value
        else:
            lines[method_label(r["cell"])].append((100 * r["cell"]["sparsity"], value))
    return {m: sorted(points) for m, points in sorted(lines.items())}, dense


def _metric_panels(records: list[dict], out_dir: Path, metrics: list[str], stem: str, ylabel, log_y: bool) -> list[Path]:
    paths = []
    for model in sorted({r["cell"]["model"] for r in records}):
        panels = [m for m in metrics if any(metric_value(r, m) is not None for r in records
                                             if r["cell"]["model"] == model)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False,
                                 gridspec_kw={"wspace": 0.35})
        for ax, metric in zip(axes[0], panels):
            lines, dense = _series(records, model, metric)
            for method, points in lines.items():
                ax.plot(*zip(*points), marker="o", label=method)
            if dense:
                ax.axhline(dense["dense"], color="black", linestyle="--", linewidth=1, label="dense")
            if log_y:
                ax.set_yscale("log")
                plain = FuncFormatter(lambda v, _: f"{v:g}")  # 26.5, not 2.65x10^1, on narrow ranges
                ax.yaxis.set_major_formatter(plain)
                low, high = ax.get_ylim()
                if high / low < 10:  # minor labels only when there is no decade label; else they overlap
                    ax.yaxis.set_minor_formatter(plain)
            ax.set_xticks(sorted({x for points in lines.values() for x, _ in points}))
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel(ylabel(metric))
            ax.set_title(f"{model}: {metric}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        paths += _save(fig, out_dir, f"{stem}_{model}")
    return paths


def plot_ppl_vs_sparsity(records: list[dict], out_dir: Path) -> list[Path]:
    """Perplexity vs sparsity per method (log y), one panel per evaluation dataset, one figure per model."""
    records = _ok(records)
    datasets = sorted({d for r in records for d in r["metrics"].get("ppl", {})})
    return _metric_panels(records, Path(out_dir), [f"ppl/{d}" for d in datasets], "ppl_vs_sparsity",
                          lambda m: f"perplexity ({m.split('/')[1]}, log)", log_y=True)


def plot_accuracy_vs_sparsity(records: list[dict], out_dir: Path) -> list[Path]:
    """Mean zero-shot accuracy vs sparsity per method, one figure per model."""
    return _metric_panels(_ok(records), Path(out_dir), ["acc_avg"], "accuracy_vs_sparsity",
                          lambda m: "mean zero-shot accuracy (%)", log_y=False)


def plot_speedup_vs_params(records: list[dict], out_dir: Path) -> list[Path]:
    """Speed-up vs fraction of parameters removed, per method (cells that measured a speed-up)."""
    points = defaultdict(list)
    for r in _ok(records):
        speedup, removed = r["metrics"].get("speedup"), r.get("params", {}).get("removed_fraction")
        if speedup is not None and removed is not None:
            points[(r["cell"]["model"], method_label(r["cell"]))].append((100 * removed, speedup))
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for (model, method), xy in sorted(points.items()):
        ax.plot(*zip(*sorted(xy)), marker="o", label=f"{model} {method}")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("speed-up (x)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(out_dir), "speedup_vs_params")


def write_plots(records: list[dict], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    return (plot_ppl_vs_sparsity(records, out_dir) + plot_accuracy_vs_sparsity(records, out_dir)
            + plot_speedup_vs_params(records, out_dir))
