"""Plots of a sweep's results (matplotlib, each figure written as PNG and SVG).

Every function takes the deduplicated results (`reports.select.unique_results`) and an output
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

from bench.core.records import Result  # noqa: E402
from reports.select import method_label  # noqa: E402

# Reproducible SVGs: no timestamp, fixed element ids
matplotlib.rcParams["svg.hashsalt"] = "prunebench"


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return paths


def _ok(records: list[Result]) -> list[Result]:
    return [r for r in records if r.ok]


def _series(records: list[Result], model: str, metric: str) -> tuple[dict, dict]:
    """({method: [(sparsity %, value)]}, {method: dense value}) of one model's metric."""
    lines, dense = defaultdict(list), {}
    for r in records:
        value = r.value(metric)
        if r.cell.model != model or value is None:
            continue
        if r.cell.method == "dense":
            dense["dense"] = value
        else:
            lines[method_label(r.cell)].append((100 * r.cell.sparsity, value))
    return {m: sorted(points) for m, points in sorted(lines.items())}, dense


def _metric_panels(records: list[Result], out_dir: Path, metrics: list[str], stem: str, ylabel,
                   log_y: bool) -> list[Path]:
    paths = []
    for model in sorted({r.cell.model for r in records}):
        panels = [m for m in metrics if any(r.value(m) is not None for r in records if r.cell.model == model)]
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


def plot_ppl_vs_sparsity(records: list[Result], out_dir: Path) -> list[Path]:
    """Perplexity vs sparsity per method (log y), one panel per evaluation dataset, one figure per model."""
    records = _ok(records)
    datasets = sorted({d for r in records for d in r.metrics.get("ppl", {})})
    return _metric_panels(records, Path(out_dir), [f"ppl/{d}" for d in datasets], "ppl_vs_sparsity",
                          lambda m: f"perplexity ({m.split('/')[1]}, log)", log_y=True)


def plot_accuracy_vs_sparsity(records: list[Result], out_dir: Path) -> list[Path]:
    """Mean zero-shot accuracy vs sparsity per method, one figure per model."""
    return _metric_panels(_ok(records), Path(out_dir), ["acc_avg"], "accuracy_vs_sparsity",
                          lambda m: "mean zero-shot accuracy (%)", log_y=False)


def plot_speedup_vs_params(records: list[Result], out_dir: Path) -> list[Path]:
    """Prefill and decode speed-up vs fraction of parameters removed, per method (structured cells)."""
    points = defaultdict(list)
    for r in _ok(records):
        removed = r.sparsity.get("params_removed")
        for stage in ("prefill", "decode"):
            speedup = r.value(f"speedup/{stage}")
            if speedup is not None and removed is not None:
                points[(r.cell.model, f"{method_label(r.cell)} {stage}")].append((100 * removed, speedup))
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


def plot_layer_schedules(results: list[Result], path) -> list[Path]:
    """Allocated sparsity of every prunable linear (block order), one panel per finished run, side by
    side with a shared y axis; written as `path` with suffixes .png and .svg. Returns the two paths."""
    runs = [r for r in results if r.ok and r.sparsity.get("allocated")]
    if not runs:
        raise ValueError("no finished result with an allocated schedule to plot")
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.2), sharey=True, squeeze=False)
    for ax, result in zip(axes[0], runs):
        allocated = result.sparsity["allocated"]  # insertion order = block order
        names = list(allocated)
        blocks = [next((int(part) for part in name.split(".") if part.isdigit()), None) for name in names]
        ax.plot(range(len(names)), list(allocated.values()), ".", markersize=3)
        ax.axhline(result.sparsity["target"], color="grey", linewidth=0.8, linestyle="--")
        starts = [i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
        step = max(1, len(starts) // 6)
        ax.set_xticks(starts[::step], [str(blocks[i]) for i in starts[::step]])
        ax.set_title(f"{method_label(result.cell)}, {result.cell.sparsity:.0%}\n"
                     f"measured {result.sparsity['measured']:.2%}", fontsize=9)
        ax.set_xlabel("decoder block (linears in block order)")
    axes[0][0].set_ylabel("sparsity")
    fig.suptitle(f"{runs[0].cell.model}: per-layer sparsity", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    return _save(fig, path.parent, path.name)


def plot_all_layer_schedules(records: list[Result], out_dir: Path) -> list[Path]:
    """One schedule figure per model and sparsity where some allocator was not uniform."""
    scheduled = [r for r in _ok(records) if r.cell.method != "dense" and r.sparsity.get("allocated")]
    written = []
    for model, sparsity in sorted({(r.cell.model, r.cell.sparsity) for r in scheduled}):
        runs = [r for r in scheduled if (r.cell.model, r.cell.sparsity) == (model, sparsity)]
        if any(len(set(r.sparsity["allocated"].values())) > 1 for r in runs):
            written += plot_layer_schedules(runs, Path(out_dir) / f"layer_schedules_{model}_{round(100 * sparsity)}")
    return written


def write_plots(records: list[Result], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    return (plot_ppl_vs_sparsity(records, out_dir) + plot_accuracy_vs_sparsity(records, out_dir)
            + plot_speedup_vs_params(records, out_dir) + plot_all_layer_schedules(records, out_dir))
