"""Offline stand-ins for lm-eval's zero-shot tasks, for machines without the hub (run by hand or by tests).

Writes a dir of local task YAMLs with the real task names (an lm-eval `include_path`): small mirrors in
each task's real schema and prompt format, built from sentences of the always-available pydoc corpus
(cloze-style items: pick the true continuation / the true word). Their scores exercise the pipeline and
degrade with pruning like the real tasks, but they are NOT the real benchmarks and are never comparable
with papers.

    python scripts/zeroshot_mirrors.py <dir> [--n 50] [--seed 0]
    python run.py eval=[ppl,zeroshot] eval.zeroshot.include_path=<dir>
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import yaml
from pydoc_data.topics import topics

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
    # beyond the papers' tasks: the last word of a passage, scored by its log-likelihood (lm-eval's
    # lambada_openai YAML: perplexity and acc, no choices)
    "lambada_openai": {"output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                       "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                       "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                       {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
}


def _sentences() -> list[str]:
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
        elif task == "lambada_openai":
            docs.append({"text": re.sub(r"\W+$", "", picks[0])})  # lambada's passages end on the word itself
        elif task == "rte":
            entailed = rng.randrange(2) == 0
            docs.append({"sentence1": picks[0], "sentence2": (context if entailed else _split(picks[1])[0]) + ".",
                         "label": 0 if entailed else 1})
    return docs


def write_mirrors(directory: Path, n: int = 50, seed: int = 0, tasks: tuple = tuple(_TEMPLATES)) -> Path:
    """Write `<task>.jsonl` + `<task>.yaml` per task into `directory` (an lm-eval include_path)."""
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
            "output_type": template.get("output_type", "multiple_choice"),
            "test_split": "test",
            "doc_to_text": template["doc_to_text"],
            "doc_to_target": template["doc_to_target"],
            **({"doc_to_choice": template["doc_to_choice"]} if "doc_to_choice" in template else {}),
            "metric_list": template.get("metric_list") or [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in template["metrics"]],
            "metadata": {"version": 1.0, "description": "prunebench offline mirror built from pydoc text; "
                                                        "NOT the real benchmark"},
        }
        (directory / f"{task}.yaml").write_text(
            "# prunebench offline mirror (scripts/zeroshot_mirrors.py); not the real benchmark\n"
            + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/zeroshot_mirrors.py",
                                     description="write offline lm-eval task mirrors (pydoc-based)")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--n", type=int, default=50, help="examples per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    where = write_mirrors(args.directory, args.n, args.seed)
    print(f"wrote {len(_TEMPLATES)} task mirrors to {where}; use eval.zeroshot.include_path={where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
