"""Calibration and evaluation text: WikiText-2 (raw), PTB, C4, the always-present pydoc corpus, and your
own files (the corpus `custom`: plain text or JSON/JSON Lines, read by the `datasets` library's own
`text` / `json` loaders; see `load_custom`).

Each named corpus is a `CorpusSpec` in `CORPORA`: its file per split under the local dir, how a file's
lines become rows, its hub source, how rows are joined for calibration and for evaluation, the
evaluation's document and window caps, and its calibration sampler. The loader reads only that
description; a new corpus is a new entry. Lookup order for a corpus: the local dir (`data.dir`, else
`$PRUNEBENCH_DATA`), then the Hugging Face hub through `datasets`. The joins follow the SparseGPT/Wanda
protocol so perplexities are comparable with the papers: WikiText-2 eval is "\\n\\n".join(rows),
calibration " ".join(rows); PTB and C4 use " ".join; C4 eval takes the first 1100 validation documents.
Tokenization and the calibration and evaluation windows are `bench/tokenization.py`'s.
"""
from __future__ import annotations

import functools
import glob
import gzip
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydoc_data.topics import topics

from bench.core.vocab import ConfigError, check_choice, check_range

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
CUSTOM = "custom"  # the dataset name (data.calib.dataset, eval.ppl.datasets) of the files in data.path
BOS_RULE = "tokenizer default (BOS at the stream start where the tokenizer adds one)"
# The calibration samplers, in the words the protocol records: `calibration_samples` (SparseGPT's) and
# `document_samples` (the references' C4 sampler).
STREAM_SAMPLING = "random windows of the joined text"
C4_SAMPLING = "random document longer than seqlen, random window inside it"


def _raw_lines(path: Path) -> list[str]:
    """WikiText-2: the HF loader's row rule, every line with its newline, blank lines as ""."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def _stripped_lines(path: Path) -> list[str]:
    """PTB: HF `sentence` has no leading space or newline."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]


def _json_lines_gz(path: Path) -> list[str]:
    """C4: gzipped JSON Lines, the `text` of every record."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def _pydoc_rows(split: str) -> list[str]:
    """CPython's documentation topics: first half of the topics is validation/train, second half test."""
    keys = sorted(topics)
    half = len(keys) // 2
    return [topics[k] for k in (keys[half:] if split == "test" else keys[:half])]


@dataclass(frozen=True)
class Hub:
    """Where `datasets.load_dataset` finds a corpus: `id` with its `config`, or with `shards` (the repo's
    data file per split, read as that split); `column` holds the text."""

    id: str
    column: str
    config: Optional[str] = None
    shards: Optional[dict] = None
    label: Optional[str] = None  # what results record as the source ("hub:<label>"); None: the id


@dataclass(frozen=True)
class Builtin:
    """A corpus shipped with Python itself: `rows(split)`, recorded as coming from `source`."""

    source: str
    rows: Callable[[str], list[str]]


@dataclass(frozen=True)
class CorpusSpec:
    """A named corpus: where its rows come from and how they become calibration and evaluation text."""

    files: dict = field(default_factory=dict)  # split -> file under the local dir
    read: Optional[Callable[[Path], list[str]]] = None  # a local file -> its rows
    hub: Optional[Hub] = None
    builtin: Optional[Builtin] = None  # always present: never missing, so never a reason to fall back
    calib_join: str = " "
    eval_join: str = " "
    eval_docs: Optional[int] = None  # evaluation text: the first this many rows (documents)
    eval_windows: Optional[int] = None  # evaluation: at most this many windows
    sampler: str = STREAM_SAMPLING  # C4_SAMPLING: rows are documents, and calibration samples one at a time


C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz",
             "test": "en/c4-validation.00000-of-00008.json.gz"}  # C4 has no test split: its validation shard
CORPORA = {
    "wikitext2": CorpusSpec(
        files={"validation": "wikitext2/wiki.valid.raw", "test": "wikitext2/wiki.test.raw",
               "train": "wikitext2/wiki.train.raw"},
        read=_raw_lines, hub=Hub("wikitext", "text", config="wikitext-2-raw-v1", label="wikitext-2-raw-v1"),
        eval_join="\n\n"),
    "ptb": CorpusSpec(
        files={"validation": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt", "train": "ptb/ptb.train.txt"},
        read=_stripped_lines, hub=Hub("ptb_text_only", "sentence", config="penn_treebank")),
    "c4": CorpusSpec(
        files={"validation": "c4/c4-validation.00000-of-00008.json.gz", "train": "c4/c4-train.00000-of-01024.json.gz"},
        read=_json_lines_gz, hub=Hub("allenai/c4", "text", shards=C4_SHARDS),
        eval_docs=1100, eval_windows=256, sampler=C4_SAMPLING),
    "pydoc": CorpusSpec(builtin=Builtin("pydoc_data", _pydoc_rows), calib_join="\n\n", eval_join="\n\n"),
}
# The custom corpus' formats: the `datasets` loader of that name, and how its rows are joined.
CUSTOM_JOINS = {"text": "\n", "json": "\n\n"}
CUSTOM_FORMATS = tuple(CUSTOM_JOINS)


@dataclass
class CalibConfig:
    dataset: str = "wikitext2"
    split: str = "validation"
    nsamples: int = 32
    seqlen: int = 512
    batch: int = 1  # samples per block forward: throughput only (statistics are fp32 sums either way)

    def __post_init__(self):
        check_choice("data.calib.dataset", self.dataset, dataset_names())
        check_choice("data.calib.split", self.split, SPLITS)
        check_range("data.calib.nsamples", self.nsamples, self.nsamples >= 1, ">= 1")
        check_range("data.calib.batch", self.batch, self.batch >= 1, ">= 1")


@dataclass
class DataConfig:
    """The `data:` config group: the calibration corpus, where named corpora are read, the custom files."""

    calib: CalibConfig = field(default_factory=CalibConfig)
    dir: Optional[str] = None  # local corpora dir; None -> $PRUNEBENCH_DATA, then the hub
    allow_fallback: bool = True  # use the pydoc corpus when a default corpus is missing
    path: Optional[Any] = None  # the `custom` corpus: a file, a glob, a list of them, or {split: files}
    format: str = "text"  # of the custom files: text | json
    field: str = "text"  # the JSON column holding the text
    name: str = "custom"  # the custom corpus' label in results

    def __post_init__(self):
        check_choice("data.format", self.format, CUSTOM_FORMATS)
        # a location the user named (data.dir, or PRUNEBENCH_DATA that the presets resolve it from) must
        # exist: a typo there would fall back to pydoc and end ok; the fallback is for no location at all
        if self.dir and not Path(self.dir).expanduser().is_dir():
            raise ConfigError(f"data.dir={self.dir!r} (set directly or through PRUNEBENCH_DATA) is not an existing "
                              f"folder; allowed: the folder holding the corpora, or unset PRUNEBENCH_DATA and "
                              f"data.dir to use the hub")


def dataset_names() -> tuple[str, ...]:
    """What data.calib.dataset and eval.ppl.datasets may name: the described corpora, then the custom files."""
    return (*CORPORA, CUSTOM)


def sampling(name: str) -> str:
    """The calibration sampler of corpus `name`, in the words the protocol records."""
    return CORPORA[name].sampler if name in CORPORA else STREAM_SAMPLING


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
    documents: Optional[list[str]] = None  # a document-sampled corpus (C4): calibration samples one at a time


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
    if name not in CORPORA:
        raise ValueError(f"dataset={name!r} is not valid; allowed: {', '.join(dataset_names())}")
    try:
        return _load(name, split, data_dir(directory), purpose)
    except DataUnavailable as exc:
        if not allow_fallback:
            raise
        log.warning("=" * 78)
        log.warning("%s", exc)
        log.warning("FALLING BACK to the offline pydoc corpus for %s; numbers are NOT comparable with "
                    "papers. Set PRUNEBENCH_DATA or data.dir to a dir with %s.", purpose, name)
        log.warning("=" * 78)
        corpus = _load("pydoc", split, None, purpose)
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
    else:
        values = rows["text"]  # the text loader's one column
    text = CUSTOM_JOINS[fmt].join(values)
    if not text.strip():
        raise ValueError(f"{key}={path!r}: the {len(files)} file(s) hold no text")
    return Corpus(label, split, text, ",".join(files) if len(files) <= 3 else f"{files[0]},... ({len(files)} files)",
                  key=f"{key}={path!r}")


MAX_CUSTOM_FILES = 10_000


def resolve_files(path: Union[str, list, None], key: str = "data.path") -> list[str]:
    """The files named by a path, a glob or a list of them (sorted, de-duplicated); a one-line error
    naming `key` when none is given or an entry matches nothing."""
    if path is None or path == "" or path == []:
        raise ValueError(f"{key} is not set; give a file, a glob or a list of them for the custom corpus")
    entries = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files = []
    for entry in entries:
        pattern = os.path.expanduser(str(entry))
        matched, empty = [], 0
        # a glob over a huge tree (`/usr/**`) would be walked whole before validation says anything
        for match in glob.iglob(pattern, recursive=True):
            if os.path.isfile(match):
                if not os.path.getsize(match):  # no text, and datasets' reader fails on it in every cell
                    empty += 1
                    continue
                matched.append(match)
                if len(matched) > MAX_CUSTOM_FILES:
                    raise ValueError(f"{key}={str(entry)!r} matches more than {MAX_CUSTOM_FILES} files; allowed: "
                                     f"a file, or a glob of at most {MAX_CUSTOM_FILES} files (narrow it)")
        matched.sort()
        if not matched:
            raise ValueError(f"{key}={str(entry)!r} matches no file"
                             + (f" with any text ({empty} empty)" if empty else ""))
        files.extend(os.path.abspath(m) for m in matched if os.path.abspath(m) not in files)
    return files


def _load(name: str, split: str, directory: Optional[Path], purpose: str) -> Corpus:
    """Corpus `name` as `CORPORA` describes it: built in, else its local file, else its hub source."""
    spec = CORPORA[name]
    if spec.builtin is not None:
        return _corpus(name, split, spec, spec.builtin.rows(split), spec.builtin.source, purpose)
    relative = spec.files.get(split)
    looked = []
    if directory is not None and relative is not None:
        path = directory / relative
        looked.append(str(path))
        if path.exists():
            try:
                rows = spec.read(path)
            except (UnicodeDecodeError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
                # the decoder's own message names a byte offset, never the file; and a broken file is no
                # reason to fall back to another corpus
                raise ValueError(f"{path} cannot be read as {name}'s {split} file ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]}); replace it with an intact copy") from None
            return _corpus(name, split, spec, rows, str(path), purpose)
    try:
        rows, source = _hub_rows(spec.hub, split)
    except Exception as exc:  # datasets raises many types for "offline" / "no such split"
        looked.append(f"the hub ({type(exc).__name__})")
        raise DataUnavailable(
            f"corpus {name!r} split {split!r} not found; looked in: {'; '.join(looked) or 'no local dir set'}. "
            f"Put the file at <dir>/{relative or '?'} and set data.dir=<dir> or PRUNEBENCH_DATA=<dir>, "
            f"or allow hub access.") from None
    return _corpus(name, split, spec, rows, source, purpose)


def _corpus(name: str, split: str, spec: CorpusSpec, rows: list[str], source: str, purpose: str) -> Corpus:
    """The rows joined for `purpose` as `spec` says; a document-sampled corpus keeps every row as a document."""
    if purpose == "eval":
        text = spec.eval_join.join(rows[:spec.eval_docs] if spec.eval_docs is not None else rows)
    else:
        text = spec.calib_join.join(rows)
    return Corpus(name, split, text, source, documents=list(rows) if spec.sampler == C4_SAMPLING else None)


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


def _hub_rows(hub: Optional[Hub], split: str) -> tuple[list[str], str]:
    """The rows of `split` from the hub, and the source results record ("hub:...")."""
    if hub is None:
        raise LookupError("the corpus has no hub source")
    import datasets  # seconds to import: only runs that read a corpus from the hub pay it

    if not _hub_reachable():
        raise ConnectionError("huggingface.co is unreachable")
    if hub.shards is not None:
        shard = hub.shards[split]
        rows = datasets.load_dataset(hub.id, data_files={split: shard}, split=split)[hub.column]
        return rows, f"hub:{hub.label or hub.id}:{shard}"
    return datasets.load_dataset(hub.id, hub.config, split=split)[hub.column], f"hub:{hub.label or hub.id}"
