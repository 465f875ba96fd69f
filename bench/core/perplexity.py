"""Perplexity under the SparseGPT protocol.

The split's text is tokenized as one sequence and cut into non-overlapping windows of an explicit
`seqlen` (no sliding context, trailing partial window dropped); each window is scored independently
and ppl = exp(mean token NLL over all windows), every window contributing seqlen - 1 predictions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of one window: `logits` (1, seqlen, vocab) scored against `ids` (1, seqlen)."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean").item()


@torch.no_grad()
def window_nlls(model: nn.Module, windows: torch.Tensor, device: str, desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64."""
    model.to(device)
    nlls = torch.empty(windows.shape[0], dtype=torch.float64)
    for index in tqdm(range(windows.shape[0]), desc=desc, unit="window"):
        ids = windows[index:index + 1].to(device)
        nlls[index] = window_nll(model(ids, use_cache=False).logits, ids)
    model.to("cpu")
    return nlls


def from_nlls(nlls: torch.Tensor) -> float:
    return math.exp(nlls.mean().item())


def perplexity(model: nn.Module, windows: torch.Tensor, device: str, desc: str = "perplexity") -> float:
    return from_nlls(window_nlls(model, windows, device, desc))
