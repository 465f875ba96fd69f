"""Which records a report shows, and under what row label."""
from __future__ import annotations

from bench.core.records import CellKey, Result


def unique_results(results: list[Result]) -> list[Result]:
    """One result per distinct config; a finished run wins over a failed or running one."""
    by_hash: dict[str, Result] = {}
    for result in results:
        if result.config_hash not in by_hash or result.ok:
            by_hash[result.config_hash] = result
    return list(by_hash.values())


def method_label(cell: CellKey) -> str:
    """The method's display name (its preset's `display`; the method name in older records), with its
    N:M or structured pattern and its quantization."""
    name = cell.display or cell.method
    label = name if cell.sparsity_type == "unstructured" or cell.baseline else f"{name} ({cell.sparsity_type})"
    return label if cell.wbits is None else f"{label} + {cell.wbits}-bit"  # quantized: its own row
