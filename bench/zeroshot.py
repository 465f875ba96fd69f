"""Zero-shot accuracy through lm-eval (EleutherAI lm-evaluation-harness 0.4.x) on the in-memory model.

The pruned model object is wrapped in lm-eval's `HFLM` (no save/reload), and lm-eval scores every
multiple-choice task by the log-likelihood of each answer: `acc` takes the highest raw log-likelihood,
`acc_norm` the highest per-byte one. Papers disagree on which one they report per task, so the choice is
config (`eval.zeroshot.metric`); both are recorded anyway, with lm-eval's version and each task's
version, the few-shot count and the example limit.

Tasks come from lm-eval's standard task registry (datasets from the hub) on users' machines, or from a
dir of local task YAMLs with the same task names (`include_path`). `write_mirrors` writes such a dir:
small offline stand-ins in each task's real schema and prompt format, built from sentences of the
always-available pydoc corpus (cloze-style items: pick the true continuation / the true word). Their
scores exercise the pipeline and degrade with pruning like the real tasks, but they are NOT the real
benchmarks and are never comparable with papers; results say which source was used.

    python -m bench.zeroshot mirrors <dir> [--n 50]     # write offline task mirrors
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
from pathlib import Path

from torch import nn

from bench.config import ZeroShotConfig

log = logging.getLogger(__name__)


def evaluate(model: nn.Module, tokenizer, cfg: ZeroShotConfig, device: str, seed: int = 0) -> dict:
    """Run the configured tasks; returns {"tasks": {task: scores}, "average": mean reported metric, ...}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model.to(device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        if cfg.include_path:
            # include_defaults=False: indexing lm-eval's thousands of task YAMLs costs ~20 s per cell
            manager = TaskManager(include_path=str(Path(cfg.include_path).expanduser().resolve()),
                                  include_defaults=False)
        else:
            manager = TaskManager()
        out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, task_manager=manager, log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    finally:
        model.to("cpu")
    tasks = {}
    for task in cfg.tasks:
        scores = out["results"][task]
        metric = cfg.metric.get(task, "acc")
        tasks[task] = {
            "metric": metric,
            "value": scores[f"{metric},none"],
            "stderr": scores.get(f"{metric}_stderr,none"),
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


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


# --- offline task mirrors -------------------------------------------------------------------------

# Prompt formats copied from lm-eval's own task YAMLs (0.4.x), so a mirror is scored like its task;
# hellaswag and winogrande store the output of lm-eval's preprocessing functions directly.
_TEMPLATES = {
    "boolq": {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
              "doc_to_choice": ["no", "yes"], "metrics": ["acc"]},
    "piqa": {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
             "doc_to_choice": "{{[sol1, sol2]}}", "metrics": ["acc", "acc_norm"]},
    "hellaswag": {"doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
                  "metrics": ["acc", "acc_norm"]},
    # doc_to_text renders the gold context's index: lm-eval then scores one continuation after each
    # candidate context (winogrande's partial scoring)
    "winogrande": {"doc_to_text": "{{label}}", "doc_to_target": "{{continuation}}", "doc_to_choice": "contexts",
                   "metrics": ["acc"]},
    "arc_easy": {"doc_to_text": "Question: {{question}}\nAnswer:",
                 "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
                 "metrics": ["acc", "acc_norm"]},
    "arc_challenge": {"doc_to_text": "Question: {{question}}\nAnswer:",
                      "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
                      "metrics": ["acc", "acc_norm"]},
    "openbookqa": {"doc_to_text": "question_stem", "doc_to_target": "{{choices.label.index(answerKey)}}",
                   "doc_to_choice": "{{choices.text}}", "metrics": ["acc", "acc_norm"]},
    "rte": {"doc_to_text": "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
            "doc_to_target": "label", "doc_to_choice": ["True", "False"], "metrics": ["acc"]},
}


def _sentences() -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    out = []
    for raw in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
        words = raw.split()
        if 10 <= len(words) <= 30 and raw[0].isupper() and raw.isascii() and not re.search(r"[|*=<>{}\[\]_]", raw):
            out.append(raw)
    return sorted(set(out))


def _split(sentence: str) -> tuple[str, str]:
    words = sentence.split()
    cut = len(words) // 2
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def _docs(task: str, sentences: list[str], n: int, rng: random.Random) -> list[dict]:
    docs = []
    for _ in range(n):
        picks = rng.sample(sentences, 4)
        context, gold = _split(picks[0])
        endings = [gold] + [_split(other)[1] for other in picks[1:]]
        if task in ("piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"):
            count = 2 if task == "piqa" else 4
            label = rng.randrange(count)
            choices = endings[1:count]
            choices.insert(label, gold)
            choices = [c.strip() for c in choices]
            if task == "piqa":
                docs.append({"goal": context, "sol1": choices[0], "sol2": choices[1], "label": label})
            elif task == "hellaswag":
                docs.append({"query": context, "choices": choices, "label": label})
            else:
                key = "question" if task.startswith("arc") else "question_stem"
                docs.append({key: context, "choices": {"text": choices, "label": list("ABCD")},
                             "answerKey": "ABCD"[label]})
        elif task == "winogrande":
            words = picks[0].split()
            blank = rng.randrange(2, len(words) - 2)
            wrong = rng.choice(picks[1].split())
            label = rng.randrange(2)
            options = [words[blank], wrong][::-1 if label else 1]
            prefix = " ".join(words[:blank])
            docs.append({"contexts": [f"{prefix} {opt}" for opt in options],
                         "continuation": " ".join(words[blank + 1:]), "label": label})
        elif task == "boolq":
            source = picks[rng.randrange(2)]
            probe = rng.choice([w for w in source.split() if len(w) > 4] or ["value"])
            docs.append({"passage": picks[0], "question": f"does the passage use the word \"{probe}\"",
                         "label": int(probe in picks[0].split())})
        elif task == "rte":
            entailed = rng.randrange(2) == 0
            docs.append({"sentence1": picks[0], "sentence2": (context if entailed else _split(picks[1])[0]) + ".",
                         "label": 0 if entailed else 1})
    return docs


def write_mirrors(directory: Path, n: int = 50, seed: int = 0, tasks: tuple = tuple(_TEMPLATES)) -> Path:
    """Write `<task>.jsonl` + `<task>.yaml` per task into `directory` (an lm-eval include_path)."""
    import yaml

    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    sentences = _sentences()
    for task in tasks:
        rng = random.Random(f"{seed}/{task}")
        data_file = directory / f"{task}.jsonl"
        data_file.write_text("".join(json.dumps(doc) + "\n" for doc in _docs(task, sentences, n, rng)))
        template = _TEMPLATES[task]
        spec = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": template["doc_to_text"],
            "doc_to_target": template["doc_to_target"],
            "doc_to_choice": template["doc_to_choice"],
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in template["metrics"]],
            "metadata": {"version": 1.0, "description": "prunebench offline mirror built from pydoc text; "
                                                        "NOT the real benchmark"},
        }
        (directory / f"{task}.yaml").write_text(
            "# prunebench offline mirror (bench/zeroshot.py); not the real benchmark\n"
            + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zeroshot")
    commands = parser.add_subparsers(dest="command", required=True)
    mirrors = commands.add_parser("mirrors", help="write offline lm-eval task mirrors (pydoc-based)")
    mirrors.add_argument("directory", type=Path)
    mirrors.add_argument("--n", type=int, default=50, help="examples per task")
    mirrors.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    where = write_mirrors(args.directory, args.n, args.seed)
    print(f"wrote {len(_TEMPLATES)} task mirrors to {where}; use eval.zeroshot.include_path={where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
