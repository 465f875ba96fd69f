"""Plots of a sweep's results (matplotlib; every figure written as PNG, SVG and PDF).

The curves come from the same DataFrame as the tables (`reports.frame`): one line per table row, a
point per sparsity at the mean over seeds, error bars of one sample std where a point has several seeds.
The dense baseline is a dashed horizontal line, since it has no sparsity axis. A function with nothing
to plot writes nothing.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from bench.core.families import block_of  # noqa: E402
from bench.core.metrics import metric  # noqa: E402
from bench.core.records import Result  # noqa: E402
from reports.frame import aggregate, long_frame, row_labels  # noqa: E402
from reports.select import method_label  # noqa: E402
from reports.table import percent  # noqa: E402

# Reproducible SVGs and PDFs: no timestamp, fixed element ids
matplotlib.rcParams["svg.hashsalt"] = "prunebench"
SUFFIXES = (".png", ".svg", ".pdf")


def _safe_stem(stem: str) -> str:
    """A file name from names read from records (a model name): no separator or dot-run can take the
    file out of its folder, whatever a record says."""
    return re.sub(r"\.\.+", "_", re.sub(r"[^A-Za-z0-9_.+=@,-]", "_", stem)).lstrip(".-") or "plot"


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{_safe_stem(stem)}{suffix}" for suffix in SUFFIXES]
    for path in paths:
        options = {"dpi": 120} if path.suffix == ".png" else {"metadata": {"CreationDate": None} if
                                                                 path.suffix == ".pdf" else {"Date": None}}
        fig.savefig(path, bbox_inches="tight", **options)
    plt.close(fig)
    return paths


def _plain_log_axis(ax) -> None:
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 26.5, not 2.65x10^1, on narrow ranges
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / low < 10:  # no decade label or one: label every minor tick
        ax.yaxis.set_minor_formatter(plain)
    elif high / low < 1000:  # a few decades: 2x and 5x between them, else one label per decade
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _metric_panels(agg: pd.DataFrame, long: pd.DataFrame, out_dir: Path, metrics: list[str], stem: str,
                   log_y: bool) -> list[Path]:
    dense_rows = set(map(tuple, long.loc[long["baseline"], ["model", "row"]].to_numpy()))
    paths = []
    for model in agg["model"].drop_duplicates():
        mine = agg[agg["model"] == model]
        panels = [m for m in metrics if (mine["metric"] == m).any()]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False,
                                 gridspec_kw={"wspace": 0.3})
        for ax, name in zip(axes[0], panels):
            points = mine[mine["metric"] == name]
            xs = sorted({100 * s for s in points["sparsity"] if s > 0})
            step = min((b - a for a, b in zip(xs, xs[1:])), default=10)
            lines = list(points.groupby("row", sort=False))
            for index, (row, line) in enumerate(lines):
                if (model, row) in dense_rows:
                    ax.axhline(line["mean"].iloc[0], color="black", linestyle="--", linewidth=1, label=row)
                    continue
                line = line.sort_values("sparsity")
                dodge = step * 0.03 * (index - (len(lines) - 1) / 2)  # overlapping error bars stay apart
                ax.errorbar(100 * line["sparsity"] + dodge, line["mean"], yerr=line["std"].fillna(0), marker="o",
                            capsize=3, label=row + (f" (n={line['n'].max()})" if line["n"].max() > 1 else ""))
            if log_y:
                _plain_log_axis(ax)
            ax.set_xticks(xs)
            if xs:
                ax.set_xlim(xs[0] - step / 3, xs[-1] + step / 3)
            ax.set_xlabel("sparsity (%)")
            label = points["label"].iloc[0]  # says "(mirror)" for scores on offline zero-shot mirrors
            ax.set_ylabel(label + (" (log)" if log_y else "") + (" (%)" if metric(name).unit == "%" else ""))
            ax.set_title(f"{model}: {label}")
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)),
                   fontsize=8, frameon=False)
        paths += _save(fig, out_dir, f"{stem}_{model}")
    return paths


def plot_ppl_vs_sparsity(agg: pd.DataFrame, long: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Perplexity vs sparsity per row (log y, error bars over seeds), a panel per dataset, a figure per model."""
    names = [m for m in agg["metric"].drop_duplicates() if m.startswith("ppl/")]
    return _metric_panels(agg, long, Path(out_dir), sorted(names), "ppl_vs_sparsity", log_y=True)


def plot_accuracy_vs_sparsity(agg: pd.DataFrame, long: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Mean zero-shot accuracy vs sparsity per row, a figure per model."""
    return _metric_panels(agg, long, Path(out_dir), ["acc_avg"], "accuracy_vs_sparsity", log_y=False)


def plot_speedup_vs_params(records: list[Result], labels: dict[int, str], out_dir: Path) -> list[Path]:
    """Prefill and decode speed-up vs parameters removed, per row; only with two or more points."""
    points = defaultdict(list)
    for r in records:
        removed = r.sparsity.get("params_removed") if r.ok else None
        for stage in ("prefill", "decode"):
            speedup = r.value(f"speedup/{stage}") if r.ok else None
            if speedup is not None and removed is not None:
                points[(r.cell.model, labels[id(r)], stage)].append((100 * removed, speedup))
    if sum(len(xy) for xy in points.values()) < 2:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (model, row, stage), xy in sorted(points.items()):
        ax.plot(*zip(*sorted(xy)), marker="o" if stage == "prefill" else "s",
                linestyle="-" if stage == "prefill" else ":", label=f"{model} {row} {stage}")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("speed-up over dense (x)")
    ax.set_title("measured speed-up vs parameters removed")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return _save(fig, Path(out_dir), "speedup_vs_params")


def block_means(allocated: dict[str, float]) -> dict[int, float]:
    """Mean allocated sparsity of each decoder block (a linear's block: the first integer in its name), in
    block order; exact for block-level allocators (uniform, OWL, the searches), a summary for per-linear ones
    (loss-estimate). Linears outside the blocks (e.g. lm_head) have no block."""
    blocks = defaultdict(list)
    for name, rate in allocated.items():
        if block_of(name) is not None:
            blocks[block_of(name)].append(rate)
    return {block: sum(rates) / len(rates) for block, rates in sorted(blocks.items())}


def plot_layer_schedules(results: list[Result], path, labels: Optional[dict[int, str]] = None) -> list[Path]:
    """Per-block allocated sparsity, one row per method, block index on the x axis and the target as a line;
    with several seeds the bar is their mean and a dot marks each seed's own schedule (a search finds a
    different one per seed). Written as `path` with suffixes .png, .svg and .pdf."""
    runs = [r for r in results if r.ok and r.sparsity.get("allocated")]
    if not runs:
        raise ValueError("no finished result with an allocated schedule to plot")
    name_of = (lambda r: labels[id(r)]) if labels else (lambda r: method_label(r.cell))
    seeds: dict[str, list[Result]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: r.cell.seed):
        seeds[name_of(r)].append(r)
    fig, axes = plt.subplots(len(seeds), 1, figsize=(6.5, 0.4 + 1.5 * len(seeds)), sharex=True, sharey=True,
                             squeeze=False)
    lowest = 100.0
    for ax, (name, replicates) in zip(axes[:, 0], seeds.items()):
        schedules = [block_means(r.sparsity["allocated"]) for r in replicates]
        indices = list(schedules[0])
        per_seed = [[100 * schedule[b] for b in indices] for schedule in schedules]
        means = [sum(values) / len(values) for values in zip(*per_seed)]
        ax.bar(indices, means, color="tab:blue", width=0.7)
        if len(replicates) > 1:
            for values in per_seed:
                ax.plot(indices, values, linestyle="none", marker=".", markersize=3, color="black")
        lowest = min(lowest, *(min(values) for values in per_seed))
        ax.axhline(100 * replicates[0].sparsity["target"], color="tab:red", linewidth=1.2, label="target")
        ax.set_ylabel("sparsity (%)", fontsize=8)
        measured = sum(r.sparsity["measured"] for r in replicates) / len(replicates)
        spread = f"; bars: mean of {len(replicates)} seeds, dots: each seed" if len(replicates) > 1 else ""
        ax.set_title(f"{name}: measured {measured:.1%}{spread}", fontsize=9, loc="left")
        ax.grid(True, axis="y", alpha=0.3)
        step = max(1, -(-len(indices) // 16))  # at most ~16 labels: 30+ block numbers would run together
        ax.set_xticks(indices[::step])
    axes[0, 0].set_ylim(max(0.0, lowest - 10), 100)
    axes[0, 0].legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("decoder block")
    fig.suptitle(f"{runs[0].cell.model}: per-block sparsity at {percent(runs[0].cell.sparsity)}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    return _save(fig, path.parent, path.name)


def plot_all_layer_schedules(records: list[Result], labels: dict[int, str], out_dir: Path) -> list[Path]:
    """One schedule figure per model and sparsity where some allocator was not uniform."""
    scheduled = [r for r in records if r.ok and not r.cell.baseline and r.sparsity.get("allocated")]
    written = []
    for model, sparsity in sorted({(r.cell.model, r.cell.sparsity) for r in scheduled}):
        runs = [r for r in scheduled if (r.cell.model, r.cell.sparsity) == (model, sparsity)]
        if any(len(set(r.sparsity["allocated"].values())) > 1 for r in runs):
            stem = _safe_stem(f"layer_schedules_{model}_{round(100 * sparsity)}")
            written += plot_layer_schedules(runs, Path(out_dir) / stem, labels)
    return written


def write_plots(records: list[Result], out_dir: Path, long: Optional[pd.DataFrame] = None) -> list[Path]:
    out_dir = Path(out_dir)
    long = long_frame(records) if long is None else long
    agg, labels = aggregate(long), row_labels(records)
    return (plot_ppl_vs_sparsity(agg, long, out_dir) + plot_accuracy_vs_sparsity(agg, long, out_dir)
            + plot_speedup_vs_params(records, labels, out_dir) + plot_all_layer_schedules(records, labels, out_dir))
