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


@torch.no_grad()
def window_nlls(model: nn.Module, windows: torch.Tensor, device: str, desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64."""
    model.to(device)
    nlls = torch.empty(windows.shape[0], dtype=torch.float64)
    for index in tqdm(range(windows.shape[0]), desc=desc, unit="window"):
        ids = windows[index:index + 1].to(device)
        logits = model(ids, use_cache=False).logits.float()
        nlls[index] = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean").item()
    model.to("cpu")
    return nlls


def perplexity(model: nn.Module, windows: torch.Tensor, device: str, desc: str = "perplexity") -> float:
    return math.exp(window_nlls(model, windows, device, desc).mean().item())
