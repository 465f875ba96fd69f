"""The metric registry: every metric is one `Metric` in `METRICS`, which says how it is produced, read,
shown and judged. Tables, targets and their verdicts, W&B summaries and the long CSV take their columns
from here; nothing else knows a metric by name.

A metric is produced either by the cell, which writes it into `Result.metrics` (`read` finds it there,
`args` lists the arguments a record holds: datasets, tasks, stages), or from a record and its baseline
record (`against`: the baseline's value of another metric minus the record's; see
`bench.core.records.baselines` for which cell is a record's baseline). `tests/test_metrics.py` fails
when an entry has neither a writer in the pipeline nor a baseline to be computed from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

TABLES = ("results", "details", "")
# after the label of a zero-shot score on offline mirrors (`zeroshot.mirror`), never the benchmark's own
MIRROR = " (mirror)"  # where a metric is a column; "": read by name only (targets)


@dataclass(frozen=True)
class Metric:
    """A metric family: `name` or `name/<argument>` (a dataset, a task, a stage) in targets and tables."""

    name: str
    direction: str  # "lower" or "higher" is better
    unit: str  # "" (a plain number), "%", "pp" (percentage points) or "x" (a ratio)
    label: str  # column label; {arg} is the argument after the slash
    decimals: int
    read: Optional[Callable[[dict, str], Optional[float]]] = None  # (record metrics, argument) -> display units
    args: Callable[[dict], list] = lambda metrics: [""]  # the arguments a record's metrics hold ("": none)
    against: Optional[str] = None  # from a record and its baseline: the baseline's `against` minus the record's
    arg: str = ""  # what the argument is (dataset, task, stage); "": the metric takes none
    default_arg: str = ""
    table: str = "results"  # one of TABLES
    column: Optional[Callable[[dict, str], str]] = None  # a `label` that depends on the record
    evaluated_by: str = ""  # the `eval.` section whose evaluation writes it (config checks targets against it)

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "lower"

    def format(self, value: float) -> str:
        return f"{value:.{self.decimals}f}" + ("x" if self.unit == "x" else "")

    def heading(self, metrics: dict, arg: str) -> str:
        """The column label of this metric in a record, which says when the scores come from offline
        mirrors: a mirror's score must never pass for the real benchmark's."""
        label = self.column(metrics, arg) if self.column else self.label
        if not (self.evaluated_by == "zeroshot" and metrics.get("zeroshot", {}).get("mirror") is True):
            return label.format(arg=arg)
        return label.format(arg=f"{arg}{MIRROR}") if arg else f"{label}{MIRROR}"


def _ppl(metrics: dict, dataset: str) -> Optional[float]:
    return metrics.get("ppl", {}).get(dataset)


def _tasks(metrics: dict) -> dict:
    return metrics.get("zeroshot", {}).get("tasks", {})


def _accuracy(kind: str) -> Callable[[dict, str], Optional[float]]:
    def read(metrics: dict, task: str) -> Optional[float]:
        scores = _tasks(metrics).get(task)
        value = None if scores is None else scores["value" if kind == "acc" else "acc_norm"]
        return None if value is None else 100 * value
    return read


def _acc_avg(metrics: dict, _: str) -> Optional[float]:
    zeroshot = metrics.get("zeroshot", {})
    return None if "average" not in zeroshot else 100 * zeroshot["average"]


def _speedup(metrics: dict, stage: str) -> Optional[float]:
    return metrics.get("speed", {}).get(f"{stage}_speedup")


METRICS = {m.name: m for m in (
    Metric("ppl", "lower", "", "{arg} ppl", 2, _ppl, lambda m: list(m.get("ppl", {})), arg="dataset",
           evaluated_by="ppl"),
    # the task's configured acc or acc_norm, labelled by which
    Metric("acc", "higher", "%", "{arg} acc", 1, _accuracy("acc"), lambda m: list(_tasks(m)), arg="task",
           column=lambda m, task: "{arg} " + _tasks(m)[task]["metric"], evaluated_by="zeroshot"),
    Metric("acc_norm", "higher", "%", "{arg} acc_norm", 1, _accuracy("acc_norm"), lambda m: list(_tasks(m)),
           arg="task", table="", evaluated_by="zeroshot"),
    Metric("acc_avg", "higher", "%", "avg acc", 1, _acc_avg,
           lambda m: [""] if "average" in m.get("zeroshot", {}) else [], evaluated_by="zeroshot"),
    Metric("speedup", "higher", "x", "{arg} speed-up", 2, _speedup,
           lambda m: [s for s in ("prefill", "decode") if f"{s}_speedup" in m.get("speed", {})],
           arg="stage", default_arg="prefill", table="details", evaluated_by="speed"),
    # percentage points of average zero-shot accuracy lost against the baseline cell
    Metric("acc_avg_drop", "lower", "pp", "avg acc drop", 2, against="acc_avg", evaluated_by="zeroshot"),
)}


# How papers print a metric's argument (datasets, lm-eval tasks); an argument not listed prints as its key.
DISPLAY = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4", "pydoc": "Python docs", "boolq": "BoolQ",
           "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc_easy": "ARC-e",
           "arc_challenge": "ARC-c", "openbookqa": "OBQA", "rte": "RTE", "lambada_openai": "LAMBADA",
           "mmlu": "MMLU", "gsm8k": "GSM8K", "ifeval": "IFEval", "prefill": "Prefill", "decode": "Decode"}
# A family's heading above its arguments' columns, and the column of an argument-less metric.
FAMILY_DISPLAY = {"ppl": "Perplexity", "acc": "Accuracy (%)", "acc_norm": "Accuracy (%)",
                  "acc_avg": "Accuracy (%)", "acc_avg_drop": "Accuracy (%)", "speedup": "Speed-up"}
ARGLESS_DISPLAY = {"acc_avg": "Avg.", "acc_avg_drop": "Avg. drop (pp)"}


def display(name: str) -> tuple[str, str]:
    """(family heading, column) a paper prints for metric `name`: ("Perplexity", "WikiText-2")."""
    family, _, arg = name.partition("/")
    heading = FAMILY_DISPLAY.get(family, metric(name).name)  # a new family prints its name until it has one
    return heading, ARGLESS_DISPLAY.get(family) or DISPLAY.get(arg, arg)


def metric(name: str) -> Metric:
    """The registry entry of `ppl/wikitext2`, `acc/boolq`, `acc_avg`, `speedup/decode`, ..."""
    family = name.partition("/")[0]
    if family not in METRICS:
        raise KeyError(f"metric {name!r} is not known; allowed: "
                       f"{', '.join(m.name + (f'/<{m.arg}>' if m.arg else '') for m in METRICS.values())}")
    return METRICS[family]


def value(name: str, metrics: dict, baseline: Optional[dict] = None) -> Optional[float]:
    """Metric `name` of a record's `metrics` (and its baseline's, for a metric computed `against` it), in
    display units; None when not measured or when it needs a baseline there is none of."""
    entry = metric(name)
    if entry.against is not None:
        if baseline is None:
            return None
        ours, theirs = value(entry.against, metrics), value(entry.against, baseline)
        return None if ours is None or theirs is None else theirs - ours
    return entry.read(metrics, name.partition("/")[2] or entry.default_arg)


def names(metrics: dict, baseline: Optional[dict] = None) -> list[str]:
    """The name of every metric a record holds (with a baseline: and those computed against it), in
    registry order; `table=""` metrics are read by name only."""
    found = []
    for entry in METRICS.values():
        if not entry.table:
            continue
        if entry.against is not None:
            found += [entry.name] if value(entry.name, metrics, baseline) is not None else []
        else:
            found += [entry.name + (f"/{arg}" if arg else "") for arg in entry.args(metrics)]
    return found
