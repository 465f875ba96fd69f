"""Zero-shot accuracy through lm-eval (EleutherAI lm-evaluation-harness 0.4.x) on the in-memory model.

The pruned model object is wrapped in lm-eval's `HFLM` (no save/reload; with `device=cuda` placed on one
GPU or dispatched over several by bench/placement.py), and lm-eval scores every
multiple-choice task by the log-likelihood of each answer: `acc` takes the highest raw log-likelihood,
`acc_norm` the highest per-byte one. Papers disagree on which one they report per task, so the choice is
config (`eval.zeroshot.metric`); both are recorded anyway, with lm-eval's version and each task's
version, the few-shot count and the example limit.

Tasks come from lm-eval's standard task registry (datasets from the hub) on users' machines, or from a
dir of local task YAMLs with the same task names (`include_path`), such as the offline mirrors that
`python scripts/zeroshot_mirrors.py <dir>` writes; results say which source was used, and lm-eval's own
files beside them name such local tasks `<task>_mirror`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from torch import nn

from bench import placement
from bench.core.vocab import ConfigError, check_choice, check_range

log = logging.getLogger(__name__)

# The papers' tasks, whose acc or acc_norm is a choice (`eval.zeroshot.metric`); any other task lm-eval's
# task manager resolves is scored by its primary metric (`_primary`).
ZEROSHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "rte")
ZEROSHOT_METRICS = ("acc", "acc_norm")
ACC_ONLY_TASKS = ("boolq", "winogrande", "rte")  # lm-eval reports no acc_norm for these
MIRROR_SUFFIX = "_mirror"  # a local task's name in lm-eval's own files: never the real benchmark's name


@dataclass
class ZeroShotConfig:
    """lm-eval zero-shot tasks (any its task manager resolves; checked when they load, before the model);
    `metric` picks acc or acc_norm per paper task, since papers differ."""

    tasks: list = field(default_factory=lambda: list(ZEROSHOT_TASKS[:7]))
    metric: dict = field(default_factory=dict)  # task -> acc | acc_norm; a task not listed uses acc
    num_fewshot: int = 0
    limit: Optional[int] = None  # examples per task; None = the whole split (paper protocol)
    batch_size: int = 1
    include_path: Optional[str] = None  # dir of local task YAMLs (offline mirrors); None = lm-eval's tasks
    log_samples: bool = False  # lm-eval's per-example samples beside its results (about 30 MB for the seven tasks)

    def __post_init__(self):
        for index, task in enumerate(self.tasks):
            check_range("eval.zeroshot.tasks", task, isinstance(task, str) and task.strip() != "",
                        "names of lm-eval tasks")
            check_range("eval.zeroshot.tasks", task, task not in self.tasks[:index], "each task once")
        for task, metric in self.metric.items():
            check_choice("eval.zeroshot.metric", task, ZEROSHOT_TASKS)
            check_choice(f"eval.zeroshot.metric.{task}", metric,
                         ("acc",) if task in ACC_ONLY_TASKS else ZEROSHOT_METRICS)
        for key, low in (("num_fewshot", 0), ("limit", 1), ("batch_size", 1)):
            value = getattr(self, key)
            check_range(f"eval.zeroshot.{key}", value, value is None or value >= low, f">= {low}")


@dataclass
class LoadedTasks:
    manager: Any  # lm-eval's TaskManager
    tasks: list  # lm-eval Task objects, datasets loaded


def load_tasks(cfg: ZeroShotConfig) -> LoadedTasks:
    """The configured tasks with their datasets, built before the model loads: a task whose data cannot be
    reached (offline without mirrors) or that lm-eval does not know is a one-line error before any pruning,
    not a failure after it."""
    from lm_eval.tasks import TaskManager  # seconds to import: only cells that evaluate zero-shot pay it

    if cfg.include_path:
        # include_defaults=False: indexing lm-eval's thousands of task YAMLs costs ~20 s per cell
        manager = TaskManager(include_path=str(Path(cfg.include_path).expanduser().resolve()), include_defaults=False)
    else:
        manager = TaskManager()
    try:
        loaded = manager.load(list(cfg.tasks))
    except Exception as exc:  # lm-eval and datasets raise many kinds (ConnectionError, KeyError, ValueError...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if cfg.include_path else ("; offline, point eval.zeroshot.include_path at local task YAMLs "
                                            "(python scripts/zeroshot_mirrors.py <dir> writes mirrors)")
        raise ConfigError(f"eval.zeroshot.tasks={list(cfg.tasks)} cannot be loaded ({type(exc).__name__}: "
                          f"{reason}){hint}") from None
    return LoadedTasks(manager, list(loaded["tasks"].values()))


def evaluate(model: nn.Module, tokenizer, cfg: ZeroShotConfig, device: str, seed: int = 0,
             out_dir: Optional[Path] = None, loaded: Optional[LoadedTasks] = None) -> dict:
    """Run the configured tasks (`loaded` by `load_tasks`, else loaded here); returns {"tasks": {task:
    scores}, "average": mean reported metric, ...}. With `out_dir`, lm-eval's own results JSON (and with
    `log_samples` its per-task samples) go to `out_dir/lm_eval/<cell dir name>/` (its EvaluationTracker), so
    the numbers can be checked with lm-eval's tools."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    loaded = loaded or load_tasks(cfg)
    tracker = EvaluationTracker(output_path=str(Path(out_dir) / "lm_eval")) if out_dir is not None else None

    with placement.placed(model, device):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=loaded.tasks, num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, task_manager=loaded.manager,
                                      log_samples=tracker is not None and cfg.log_samples,
                                      evaluation_tracker=tracker, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    if tracker is not None:
        # lm-eval names its folder after the model, which a model object passed in has not: a random id
        tracker.general_config_tracker.model_name = tracker.general_config_tracker.model_name_sanitized = \
            Path(out_dir).name
        samples = out.pop("samples", None)
        mirrored = set(out["configs"]) if cfg.include_path else set()
        name = lambda key: f"{key}{MIRROR_SUFFIX}" if key in mirrored else key  # noqa: E731
        saved = {key: _renamed(value, name) for key, value in out.items()}
        for config in saved.get("configs", {}).values():
            config["task"] = name(config["task"])
        for scores in saved.get("results", {}).values():  # each score names its task again, and its alias
            scores.update({key: name(scores[key]) for key in ("name", "alias") if key in scores})
        tracker.save_results_aggregated(results=saved, samples=_renamed(samples, name))
        for task in out["configs"] if samples else ():
            tracker.save_results_samples(task_name=name(task), samples=samples[task])
    tasks = {}
    for task in cfg.tasks:
        scores = out["results"][task]
        metric = cfg.metric.get(task, "acc") if task in ZEROSHOT_TASKS else _primary(out, task)
        tasks[task] = {
            "metric": metric,
            "value": _score(scores, metric),
            "stderr": _score(scores, f"{metric}_stderr", None),
            "acc": scores.get("acc,none"),
            "acc_norm": scores.get("acc_norm,none"),
            "version": out["versions"].get(task),
            "samples": out["n-samples"][task]["effective"],
        }
    return {
        "tasks": tasks,
        "average": sum(t["value"] for t in tasks.values()) / len(tasks),
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version("lm_eval"),
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "source": f"local task YAMLs: {cfg.include_path}" if cfg.include_path else "lm-eval standard tasks",
    }


_MISSING = object()


def _renamed(value: Any, name) -> Any:
    """A dict of lm-eval's output with its keys renamed by `name` (which renames task names only),
    copied one level deep; anything else as it is."""
    if not isinstance(value, dict):
        return value
    return {name(key): dict(entry) if isinstance(entry, dict) else entry for key, entry in value.items()}


def _score(scores: dict, metric: str, default=_MISSING):
    """lm-eval's `<metric>,<filter>` entry: `none` where the task has no filter, else its first filter
    (gsm8k's `strict-match`)."""
    keys = [f"{metric},none"] + [key for key in scores if key.startswith(f"{metric},")]
    found = next((key for key in keys if key in scores), None)
    if found is None:
        if default is _MISSING:
            raise KeyError(f"lm-eval reported no {metric} ({', '.join(sorted(scores))})")
        return default
    return scores[found]


def _primary(out: dict, task: str) -> str:
    """lm-eval's primary metric of a task: the first of its `metric_list` where higher is better (a score
    in [0, 1], shown in %; lambada's perplexity comes first, its accuracy is the score)."""
    listed = [entry["metric"] for entry in out["configs"].get(task, {}).get("metric_list", [])
              if entry.get("higher_is_better", True)]
    better = [name for name, higher in out.get("higher_is_better", {}).get(task, {}).items() if higher]
    return next(iter(listed + better), "acc")


def _version(package: str) -> str:
    return metadata.version(package)
