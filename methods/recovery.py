"""Recovery fine-tuning after structured pruning: LoRA (Hu et al. 2021) on every prunable linear of the
pruned model, merged back into the weights afterwards, so the result is a plain (smaller) model. Its own
config group (`recovery=none|lora|ig_lora`), composable with any structured method.

`ig_lora` is CFSP's importance-guided variant (Wang et al. 2024, Sec. 3.4): blocks the coarse scores
rate more important get more trainable capacity. The paper allocates "training overhead" by the coarse
block importance without a closed formula we could follow exactly; we give block l the LoRA rank
max(1, round(rank x z_l / mean z)) with z_l the coarse (post-sigmoid) block scores, so the mean rank
stays `rank` and the trainable budget matches plain LoRA. PEFT scales a LoRA update by alpha / r, so a
fixed alpha would give the low-rank (least important) blocks the largest updates (ranks 3 and 13:
scalings 5.33 and 1.23); each block's alpha is scaled with its rank instead, so every block keeps the
scaling `alpha / rank` of plain LoRA and importance changes capacity only. When the allocator computed block scores
(`Allocator.block_weights`, e.g. `cfsp_coarse`) they are reused; otherwise they are computed on the
pruned model (one forward pass over the calibration samples, sigmoid sharpness `importance_a`).

Training data: `steps` x `batch` windows of `seqlen` tokens at seeded random offsets of the calibration
corpus (the same text the method calibrated on; never the evaluation split; the harness cuts them),
next-token loss, AdamW, constant learning rate.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from tqdm import tqdm

from bench.core.families import arch_for
from bench.core.vocab import check_choice, check_range
from methods.allocators.cfsp_coarse import block_distances, sigmoid_scores

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)

RECOVERIES = ("none", "lora", "ig_lora")


@dataclass
class RecoveryOptions:
    """The `recovery:` config group."""

    name: str = "none"  # none | lora | ig_lora
    steps: int = 200
    batch: int = 1
    seqlen: int = 128
    lr: float = 2e-4
    rank: int = 8
    alpha: float = 16.0
    importance_a: float = 1.0  # ig_lora without allocator scores: sigmoid sharpness of the block scores

    def __post_init__(self):
        check_choice("recovery.name", self.name, RECOVERIES)
        for key in ("steps", "batch", "seqlen", "rank"):
            check_range(f"recovery.{key}", getattr(self, key), getattr(self, key) >= 1, ">= 1")
        check_range("recovery.lr", self.lr, self.lr > 0, "> 0")
        check_range("recovery.importance_a", self.importance_a, self.importance_a >= 0, ">= 0")

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def windows(self) -> int:
        return self.steps * self.batch


def lora_ranks(model: nn.Module, rank: int, block_weights: Optional[list[float]]) -> dict[str, int]:
    """Full linear name -> LoRA rank: `rank` everywhere, or scaled per block by `block_weights`."""
    arch = arch_for(model)
    ranks = {}
    for index, block in enumerate(arch.blocks(model)):
        block_rank = rank
        if block_weights is not None:
            block_rank = max(1, round(rank * block_weights[index] / (sum(block_weights) / len(block_weights))))
        for name in arch.linears(block):
            ranks[f"{arch.block_name(index)}.{name}"] = block_rank
    return ranks


def lora_config(ranks: dict[str, int], options: RecoveryOptions) -> LoraConfig:
    """PEFT's config for these per-linear ranks, with alpha / r = options.alpha / options.rank everywhere."""
    # seconds to import, and bench.config imports this module for RecoveryOptions: only recovery pays it
    from peft import LoraConfig

    patterns = {re.escape(name): r for name, r in ranks.items()}
    return LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=0.0, target_modules=list(ranks),
                      rank_pattern=patterns,
                      alpha_pattern={name: options.alpha * r / options.rank for name, r in patterns.items()},
                      bias="none")


def recover(model: nn.Module, windows: torch.Tensor, samples: torch.Tensor, options: RecoveryOptions,
            block_weights: Optional[list[float]], seed: int, device: str) -> tuple[nn.Module, dict]:
    """Fine-tune `model` with (IG-)LoRA on `windows` (options.windows, options.seqlen), returns the
    merged model and a summary (ranks, losses, seconds). `samples` (the calibration samples) score the
    blocks for ig_lora when the allocator gave no `block_weights`."""
    start = time.perf_counter()
    arch = arch_for(model)
    if options.name == "ig_lora" and block_weights is None:
        block_weights = sigmoid_scores(block_distances(model, samples, device), options.importance_a)
    ranks = lora_ranks(model, options.rank, block_weights if options.name == "ig_lora" else None)
    config = lora_config(ranks, options)
    torch.manual_seed(seed)
    from peft import get_peft_model

    peft_model = get_peft_model(model, config).to(device)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr)
    losses = []
    for step in tqdm(range(options.steps), desc=f"recovery ({options.name})", unit="step"):
        batch = windows[step * options.batch:(step + 1) * options.batch].to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    merged = peft_model.merge_and_unload().to("cpu").eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    window = max(1, len(losses) // 10)
    summary = {
        "kind": options.name, "steps": options.steps, "batch": options.batch,
        "seqlen": options.seqlen, "lr": options.lr, "lora_alpha": options.alpha,
        "lora_scaling": options.alpha / options.rank,
        "ranks_per_block": [ranks[f"{arch.block_name(i)}.{arch.ffn_out}"] for i in range(len(arch.blocks(model)))],
        "trainable_params": sum(p.numel() for p in trainable),
        "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
        "seconds": time.perf_counter() - start,
    }
    log.info("recovery %s: loss %.3f -> %.3f in %.0f s", options.name, summary["loss_first"],
             summary["loss_last"], summary["seconds"])
    return merged, summary
