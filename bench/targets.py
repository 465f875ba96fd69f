"""Paper targets in a config (`targets:` of an experiment preset): each names a known metric, its tolerance
with its unit, and a metric this config's evaluations produce, checked before any cell runs."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bench.core.metrics import METRICS
from bench.core.vocab import ConfigError, check_choice, check_range
from methods.catalog import MethodSpec

if TYPE_CHECKING:  # bench.config imports this module
    from bench.config import EvalConfig


TARGET_UNITS = ("relative", "absolute")  # tolerance as a fraction of the reported value, or in its units


def check_targets(targets: list, evaluation: "EvalConfig", method: MethodSpec, structured: bool) -> None:
    """Every target names a known metric, a tolerance with its unit, and a metric this config's evals
    produce; the message names the target."""
    for index, target in enumerate(targets):
        where = f"targets[{index}] ({target.get('model')} {target.get('method')} {target.get('sparsity')} " \
                f"{target.get('metric')})"
        name = str(target.get("metric"))
        family, _, arg = name.partition("/")
        if family not in METRICS:
            raise ConfigError(f"{where}: metric={name!r} is not known; allowed: {', '.join(METRICS)}")
        check_choice(f"{where}: unit", target.get("unit"), TARGET_UNITS)
        check_range(f"{where}: tolerance", target.get("tolerance"),
                    isinstance(target.get("tolerance"), (int, float)) and target["tolerance"] >= 0, ">= 0")
        reported = target.get("reported")
        # a verdict divides by it (relative tolerance) and compares with it: else every collect fails
        check_range(f"{where}: reported", reported, isinstance(reported, (int, float))
                    and not isinstance(reported, bool) and math.isfinite(reported) and reported != 0,
                    "the paper's number: finite and not 0")
        section = METRICS[family].evaluated_by
        if section == "ppl" and (evaluation.ppl is None or (arg or "wikitext2") not in evaluation.ppl.datasets):
            raise ConfigError(f"{where}: no configured eval produces {name}; eval.ppl.datasets="
                              f"{evaluation.ppl.datasets if evaluation.ppl else None} (add eval=ppl with that dataset)")
        if section == "zeroshot" and (
                evaluation.zeroshot is None or (arg and arg not in evaluation.zeroshot.tasks)):
            raise ConfigError(f"{where}: no configured eval produces {name}; eval.zeroshot.tasks="
                              f"{evaluation.zeroshot.tasks if evaluation.zeroshot else None} (add eval=[ppl,zeroshot])")
        if section == "speed" and (evaluation.speed is None
                                   or (target.get("method") == method.name and not structured)):
            raise ConfigError(f"{where}: no configured eval produces {name}; the speed-up is measured for structured "
                              f"pruners with eval.speed set (eval.speed={'set' if evaluation.speed else None}, "
                              f"method.pruner={method.pruner})")
