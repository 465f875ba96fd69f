"""What makes two cells the same cell, in one place: the config hash a sweep resumes by and the table row
a report folds seeds into both come from the policy here, so they cannot drift apart.

A key is named by its dotted path in the resolved config and covers everything under it. The policy:
- `NOT_NUMERIC`: keys that change no number a cell produces (where a checkpoint goes, how results are
  logged, how a table names a method). Out of the hash and out of a row's identity.
- `LATER_KEYS`: keys added after results existed, at the value that reproduces those results. At that
  value a key is dropped, so an earlier record, which lacks the key, stays the same cell: a resumed sweep
  does not re-run it and a table does not split its row.
- `TABLE_AXES`: what a table lays out rather than tells apart: sections (`model`), columns (`sparsity`)
  and replicates (`seed`, and a search's `method.seed`, which follows the cell's `${seed}`). They split
  the hash (each is its own cell) but never a row.
- `BASELINE_SHARES`: what a cell and the baseline cell it is compared with (`acc_avg_drop`) have in
  common; the method and the sparsity are what differ.

The hash is a protocol: changing how it is computed re-runs every finished cell of a resumed sweep
(`tests/test_identity.py` pins it).
"""
from __future__ import annotations

import hashlib
import json

# method.realised_pruner only adds the loss estimate's fit (`allocator.realised_fit`) to the record; the
# presets set it to their own pruner, so no single LATER_KEYS value would keep their earlier hashes
NOT_NUMERIC = ("save_dir", "save_format", "device", "targets", "paper_protocol", "logger", "rerun", "cache",
               "resume_every_s", "method.display", "eval.zeroshot.log_samples",
               "plan", "method.realised_pruner", "eval.ppl.batch")
LATER_KEYS = {"data.calib.batch": 1, "method.targets": ["Linear"], "method.ignore": []}
TABLE_AXES = ("model", "sparsity", "seed", "method.seed")
BASELINE_SHARES = ("model", "protocol", "seed", "data", "eval")


def cell_identity(config: dict) -> dict:
    """The resolved `config` without the keys that do not make it another cell (`config` unchanged)."""
    for key in NOT_NUMERIC:
        config = _without(config, key.split("."))
    for key, default in LATER_KEYS.items():
        config = _without(config, key.split("."), default)
    return config


def config_hash(config: dict) -> str:
    """16 hex digits of the sha256 of the cell identity as canonical JSON."""
    canonical = json.dumps(cell_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def row_identity(config: dict) -> dict[str, str]:
    """{dotted key: value as text} of what sets a table row apart: the cell identity without the table's axes."""
    flat = _flat(cell_identity(config))
    return {key: value for key, value in flat.items()
            if not any(key == axis or key.startswith(f"{axis}.") for axis in TABLE_AXES)}


def baseline_identity(config: dict) -> str:
    """What a cell must share with its baseline cell (`BASELINE_SHARES`), as canonical JSON."""
    identity = cell_identity(config)
    return json.dumps({key: identity.get(key) for key in BASELINE_SHARES}, sort_keys=True, default=str)


def _without(tree, path: list[str], default=...):
    """`tree` without the key at `path` (only where it holds `default`, when one is given), copied along the path."""
    head, *rest = path
    if not isinstance(tree, dict) or head not in tree:
        return tree
    if rest:
        return {**tree, head: _without(tree[head], rest, default)}
    return {k: v for k, v in tree.items() if k != head or (default is not ... and v != default)}


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True) if isinstance(value, list) else str(value)
    return out
