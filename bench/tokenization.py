"""Token ids and the windows cut from them: calibration samples and evaluation windows.

Tokenization and calibration sampling follow the reference code (SparseGPT's and Wanda's datautils):
the tokenizer runs with its defaults, so a tokenizer that adds BOS (OPT, LLaMA, Gemma) puts one at the
start of the token stream; calibration windows of WikiText-2/PTB/pydoc start at seeded random offsets of
the joined text; C4 calibration draws a random document longer than seqlen and a random window inside it
(documents are tokenized one at a time, never the whole shard). `bench/protocol.py` records both rules.
"""
from __future__ import annotations

import random
from typing import Optional

import torch

from bench.data import CORPORA


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long row of token ids (1, N), with the tokenizer's default special tokens, as the reference
    code calls it (`tokenizer(text)`): BOS first where the tokenizer adds one."""
    table = getattr(tokenizer, "byte_ids", None)  # `models.byte_tokenizer`'s: one token per byte, no BOS
    if table is not None and text and not any(token in text for token in tokenizer.get_added_vocab()):
        return table[torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()].unsqueeze(0)
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
            raise ValueError(f"1000 random calibration documents had none longer than "
                             f"data.calib.seqlen={seqlen} tokens")
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
    dropped, as in the SparseGPT protocol. A corpus whose description caps its windows (C4: 256, by that
    protocol) is cut there."""
    count = ids.shape[1] // seqlen
    cap = CORPORA[dataset].eval_windows if dataset in CORPORA else None
    if cap is not None:
        count = min(count, cap)
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"{key or dataset}: {ids.shape[1]} tokens is less than one window of "
                         f"eval.ppl.seqlen={seqlen}")
    return ids[0, :count * seqlen].view(count, seqlen)
