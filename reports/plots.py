"""Plots drawn from result JSONs (a number only ever comes from a result file)."""
from __future__ import annotations

from pathlib import Path


def plot_layer_schedules(results: list[dict], path) -> list[Path]:
    """Allocated sparsity of every prunable linear (block order), one panel per finished run, side by
    side with a shared y axis; written as `path` with suffixes .png and .svg. Returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.get("status") == "ok" and r.get("sparsity", {}).get("allocated")]
    if not runs:
        raise ValueError("no finished result with an allocated schedule to plot")
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.2), sharey=True, squeeze=False)
    for ax, result in zip(axes[0], runs):
        allocated = result["sparsity"]["allocated"]  # insertion order = block order
        names = list(allocated)
        blocks = [next((int(part) for part in name.split(".") if part.isdigit()), None) for name in names]
        ax.plot(range(len(names)), list(allocated.values()), ".", markersize=3)
        ax.axhline(result["sparsity"]["target"], color="grey", linewidth=0.8, linestyle="--")
        starts = [i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
        step = max(1, len(starts) // 6)
        ax.set_xticks(starts[::step], [str(blocks[i]) for i in starts[::step]])
        cell = result["cell"]
        wbits = result.get("config", {}).get("method", {}).get("wbits")
        ax.set_title(f"{cell['method']}{f' + {wbits}-bit' if wbits else ''}, {cell['sparsity']:.0%}\n"
                     f"measured {result['sparsity']['measured']:.2%}", fontsize=9)
        ax.set_xlabel("decoder block (linears in block order)")
    axes[0][0].set_ylabel("sparsity")
    fig.suptitle(f"{runs[0]['cell']['model']}: per-layer sparsity", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path.with_suffix(".png"), path.with_suffix(".svg")]
    for out in written:
        fig.savefig(out, dpi=150)
    plt.close(fig)
    return written
