"""The layering is a contract (pyproject.toml, import-linter): the core imports nothing else of ours,
methods stand on the core alone, the harness and reports never import each other. A new upward import,
a harness module left out of the contract, an import cycle, or an import hidden inside a function fails
here."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import deque
from pathlib import Path

import grimp

from tests.conftest import ROOT

PACKAGES = ("bench", "methods", "reports")


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def test_no_undefined_or_unused_names():
    """pyflakes' checks (ruff's F rules): an undefined name in a path only a slow test reaches (e.g. recovery
    after a prune) fails here in a second instead of in that test, or in a user's cell."""
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run([str(ruff), "check", "--no-cache", "--select", "F", *PACKAGES, "run.py", "prunebench.py", "hydra_plugins",
                           "scripts", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_every_harness_module_is_in_the_contract():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    harness = next(c for c in contracts if c["id"] == "harness")["layers"][0]
    listed = {name.strip() for name in harness.split(":")}
    modules = {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__"}
    assert modules == listed, f"add to the harness layer: {sorted(modules - listed)}; stale: {sorted(listed - modules)}"


def test_no_import_of_ours_hides_inside_a_function():
    hidden = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                for node in ast.walk(function):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                    hidden += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                               if n.split(".")[0] in PACKAGES]
    assert not hidden, hidden


def _shortest_cycle(edges: dict[str, set[str]], start: str):
    """The shortest import chain from `start` back to itself, or None."""
    previous, todo = {}, deque([start])
    while todo:
        module = todo.popleft()
        for target in sorted(edges.get(module, ())):
            if target == start:
                chain = [module]
                while chain[-1] != start:
                    chain.append(previous[chain[-1]])
                return [start, *reversed(chain[:-1]), start]
            if target not in previous:
                previous[target] = module
                todo.append(target)
    return None


def test_no_import_cycles_package_inits_included():
    """Python runs a package's init before any module of the package, so every module also imports its
    parent packages: a package init that imports its own modules (a registry filled by eager imports)
    closes a cycle with each of them. `if TYPE_CHECKING` imports run never and do not count."""
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)
    edges = {}
    for module in graph.modules:
        targets = set(graph.find_modules_directly_imported_by(module))
        for name in [module, *targets]:
            parts = name.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts)))
        targets.discard(module)
        edges[module] = targets
    cycles = [" -> ".join(chain) for chain in map(lambda m: _shortest_cycle(edges, m), sorted(edges)) if chain]
    assert not cycles, cycles[:5]


def test_every_module_reads_in_one_sitting():
    """A module of bench/, methods/ or reports/ over 400 lines holds two rooms: split it where they meet."""
    long = {str(path.relative_to(ROOT)): n for package in ("bench", "methods", "reports")
            for path in (ROOT / package).rglob("*.py") if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
