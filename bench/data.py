"""Calibration and evaluation text: WikiText-2 (raw), PTB, C4, the always-present pydoc corpus, and your
own files (the corpus `custom`: plain text or JSON/JSON Lines, read by the `datasets` library's own
`text` / `json` loaders; see `load_custom`).

Lookup order for a corpus: the local dir (`data.dir`, else `$PRUNEBENCH_DATA`), then the Hugging Face
hub through `datasets`. The joins follow the SparseGPT/Wanda protocol so perplexities are comparable
with the papers: WikiText-2 eval is "\\n\\n".join(rows), calibration " ".join(rows); PTB and C4 use
" ".join; C4 eval takes the first 1100 validation documents.

Tokenization and calibration sampling follow the reference code (SparseGPT's and Wanda's datautils):
the tokenizer runs with its defaults, so a tokenizer that adds BOS (OPT, LLaMA, Gemma) puts one at the
start of the token stream; calibration windows of WikiText-2/PTB/pydoc start at seeded random offsets of
the joined text; C4 calibration draws a random document longer than seqlen and a random window inside it
(documents are tokenized one at a time, never the whole shard). `bench/protocol.py` records both rules.
"""
from __future__ import annotations

import functools
import glob
import random
import gzip
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from pydoc_data.topics import topics

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
LOCAL_FILES = {
    ("wikitext2", "validation"): "wikitext2/wiki.valid.raw",
    ("wikitext2", "test"): "wikitext2/wiki.test.raw",
    ("wikitext2", "train"): "wikitext2/wiki.train.raw",
    ("ptb", "validation"): "ptb/ptb.valid.txt",
    ("ptb", "test"): "ptb/ptb.test.txt",
    ("ptb", "train"): "ptb/ptb.train.txt",
    ("c4", "validation"): "c4/c4-validation.00000-of-00008.json.gz",
    ("c4", "train"): "c4/c4-train.00000-of-01024.json.gz",
}
CUSTOM = "custom"  # the dataset name (data.calib.dataset, eval.ppl.datasets) of the files in data.path
CUSTOM_FORMATS = ("text", "json")
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256


class DataUnavailable(RuntimeError):
    """A named corpus could be found neither locally nor on the hub."""


@dataclass
class Corpus:
    name: str  # the corpus actually used
    split: str
    text: str
    source: str  # local path, "hub:<id>" or "pydoc_data"
    fallback_for: Optional[str] = None  # the corpus that was asked for, when we fell back
    key: Optional[str] = None  # custom corpora: the config key that names the files, for error messages
    documents: Optional[list[str]] = None  # C4: the documents, which calibration samples one at a time


def data_dir(configured: Optional[str]) -> Optional[Path]:
    value = configured or os.environ.get("PRUNEBENCH_DATA")
    return Path(value).expanduser() if value else None


def load_corpus(name: str, split: str, directory: Optional[str], purpose: str,
                allow_fallback: bool = False, path: Union[str, list, dict, None] = None, fmt: str = "text",
                field: str = "text", label: str = CUSTOM) -> Corpus:
    """The text of `name`/`split` joined for `purpose` ("calib" or "eval"). `name="custom"` reads the
    files `path` (see `load_custom`; `fmt`, `field`, `label` apply to it only) and never falls back."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; allowed: {', '.join(SPLITS)}")
    if name == CUSTOM:
        return load_custom(path, split, fmt, field, label)
    if name == "pydoc":
        return _pydoc(split)
    try:
        return _local_or_hub(name, split, data_dir(directory), purpose)
    except DataUnavailable as exc:
        if not allow_fallback:
            raise
        log.warning("=" * 78)
        log.warning("%s", exc)
        log.warning("FALLING BACK to the offline pydoc corpus for %s; numbers are NOT comparable with "
                    "papers. Set PRUNEBENCH_DATA or data.dir to a dir with %s.", purpose, name)
        log.warning("=" * 78)
        corpus = _pydoc(split)
        corpus.fallback_for = name
        return corpus


def load_custom(path: Union[str, list, dict, None], split: str, fmt: str = "text", field: str = "text",
                label: str = CUSTOM) -> Corpus:
    """Your own corpus, read with `datasets.load_dataset(fmt, data_files=<files>)`.

    `path`: a file, a glob (`**` recurses) or a list of them, used for every split; or a mapping
    {split: file | glob | list} to keep calibration and evaluation text apart (`split` picks one).
    `fmt="text"`: every line is a row and the rows are joined with "\\n" (the files' own text);
    `fmt="json"`: JSON or JSON Lines (optionally .gz), one document per record, the string column `field`,
    documents joined with "\\n\\n". The same join serves calibration and evaluation. `label` is the name
    the corpus carries in results (config key `data.name`).
    """
    if fmt not in CUSTOM_FORMATS:
        raise ValueError(f"data.format={fmt!r} is not valid; allowed: {', '.join(CUSTOM_FORMATS)}")
    key = "data.path"
    if isinstance(path, dict):
        unknown = sorted(set(path) - set(SPLITS))
        if unknown:
            raise ValueError(f"data.path has split keys {unknown}; allowed: {', '.join(SPLITS)}")
        if split not in path:
            raise ValueError(f"data.path.{split} is not set: the custom corpus has files for split(s) "
                             f"{', '.join(path)} only")
        key, path = f"data.path.{split}", path[split]
    files = resolve_files(path, key)
    import datasets

    try:
        rows = datasets.load_dataset(fmt, data_files=files, split="train")
    except Exception as exc:  # datasets' own parse errors (bad JSON, mixed columns, ...)
        raise ValueError(f"{key}={path!r}: the `datasets` {fmt} loader failed: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if fmt == "json":
        if field not in rows.column_names:
            raise ValueError(f"data.field={field!r} is not a column of {key}={path!r}; "
                             f"columns: {', '.join(rows.column_names) or 'none'}")
        values = rows[field]
        bad = next((v for v in values if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"data.field={field!r} of {key}={path!r} holds a {type(bad).__name__}, not text")
        text = "\n\n".join(values)
    else:
        text = "\n".join(rows["text"])
    if not text.strip():
        raise ValueError(f"{key}={path!r}: the {len(files)} file(s) hold no text")
    return Corpus(label, split, text, ",".join(files) if len(files) <= 3 else f"{files[0]},... ({len(files)} files)",
                  key=f"{key}={path!r}")


def resolve_files(path: Union[str, list, None], key: str = "data.path") -> list[str]:
    """The files named by a path, a glob or a list of them (sorted, de-duplicated); a one-line error
    naming `key` when none is given or an entry matches nothing."""
    if path is None or path == "" or path == []:
        raise ValueError(f"{key} is not set; give a file, a glob or a list of them for the custom corpus")
    entries = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files = []
    for entry in entries:
        pattern = os.path.expanduser(str(entry))
        matched = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
        if not matched:
            raise ValueError(f"{key}={str(entry)!r} matches no file")
        files.extend(os.path.abspath(m) for m in matched if os.path.abspath(m) not in files)
    return files


def _local_or_hub(name: str, split: str, directory: Optional[Path], purpose: str) -> Corpus:
    relative = LOCAL_FILES.get((name, split))
    looked = []
    if directory is not None and relative is not None:
        path = directory / relative
        looked.append(str(path))
        if path.exists():
            rows = _read_local(name, path)
            return Corpus(name, split, _join(name, rows, purpose), str(path), documents=_documents(name, rows))
    try:
        rows, hub_id = _hub_rows(name, split)
    except Exception as exc:  # datasets raises many types for "offline" / "no such split"
        looked.append(f"the hub ({type(exc).__name__})")
        raise DataUnavailable(
            f"corpus {name!r} split {split!r} not found; looked in: {'; '.join(looked) or 'no local dir set'}. "
            f"Put the file at <dir>/{relative or '?'} and set data.dir=<dir> or PRUNEBENCH_DATA=<dir>, "
            f"or allow hub access.") from None
    return Corpus(name, split, _join(name, rows, purpose), f"hub:{hub_id}", documents=_documents(name, rows))


def _documents(name: str, rows: list[str]) -> Optional[list[str]]:
    return list(rows) if name == "c4" else None


def _read_local(name: str, path: Path) -> list[str]:
    if name == "c4":
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line)["text"] for line in handle]
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if name == "wikitext2":  # the HF loader's row rule: blank lines become ""
        return [line if line.strip() else "" for line in lines]
    return [line.strip() for line in lines]  # PTB: HF `sentence` has no leading space or newline


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """A 3-second TCP probe, so machines without the hub fail over in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _hub_rows(name: str, split: str) -> tuple[list[str], str]:
    import datasets  # seconds to import: only runs that read a corpus from the hub pay it

    if not _hub_reachable():
        raise ConnectionError("huggingface.co is unreachable")

    if name == "wikitext2":
        return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"], "wikitext-2-raw-v1"
    if name == "ptb":
        return (datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"],
                "ptb_text_only")
    shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
    rows = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"]
    return rows, f"allenai/c4:{shard}"


def _join(name: str, rows: list[str], purpose: str) -> str:
    if name == "c4" and purpose == "eval":
        rows = rows[:C4_EVAL_DOCS]
    if name == "wikitext2" and purpose == "eval":
        return "\n\n".join(rows)
    return " ".join(rows)


def _pydoc(split: str) -> Corpus:
    """CPython's documentation topics: first half of the topics is validation/train, second half test."""
    keys = sorted(topics)
    half = len(keys) // 2
    chosen = keys[half:] if split == "test" else keys[:half]
    return Corpus("pydoc", split, "\n\n".join(topics[k] for k in chosen), "pydoc_data")


BOS_RULE = "tokenizer default (BOS at the stream start where the tokenizer adds one)"
C4_SAMPLING = "random document longer than seqlen, random window inside it"
STREAM_SAMPLING = "random windows of the joined text"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long row of token ids (1, N), with the tokenizer's default special tokens, as the reference
    code calls it (`tokenizer(text)`): BOS first where the tokenizer adds one."""
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def document_samples(tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The references' C4 sampler, (n, seqlen): per sample, random documents until one has more than
    `seqlen` tokens, then a random window inside it (Python's `random`, seeded, as in Wanda's get_c4)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(nsamples):
        for _attempt in range(1000):
            ids = tokenize(tokenizer, documents[rng.randint(0, len(documents) - 1)])
            if ids.shape[1] > seqlen:
                break
        else:
            raise ValueError(f"1000 random calibration documents had none longer than data.calib.seqlen={seqlen} tokens")
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        samples.append(ids[0, start:start + seqlen])
    return torch.stack(samples)


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                        key: Optional[str] = None) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets (the SparseGPT sampler), (n, seqlen).
    With `key` (a custom corpus: `Corpus.key`, naming its files) the text must hold nsamples x seqlen tokens,
    so that the windows can be distinct."""
    total = ids.shape[1]
    if key is not None and total < max(nsamples * seqlen, seqlen + 1):
        raise ValueError(f"{key}: {total} tokens, fewer than data.calib.nsamples x data.calib.seqlen = "
                         f"{nsamples} x {seqlen} = {nsamples * seqlen}; add text or lower them")
    if total <= seqlen:
        raise ValueError(f"calibration text has {total} tokens, fewer than data.calib.seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[0, s:s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: Optional[int], dataset: str,
                 key: Optional[str] = None) -> torch.Tensor:
    """Non-overlapping windows (n, seqlen) covering the text from its start; a trailing partial window is
    dropped, as in the SparseGPT protocol. C4 is capped at 256 windows by that protocol."""
    count = ids.shape[1] // seqlen
    if dataset == "c4":
        count = min(count, C4_EVAL_WINDOWS)
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"{key or dataset}: {ids.shape[1]} tokens is less than one window of "
                         f"eval.ppl.seqlen={seqlen}")
    return ids[0, :count * seqlen].view(count, seqlen)
