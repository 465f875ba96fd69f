"""Recovery fine-tuning after structured pruning: LoRA (Hu et al. 2021) on every prunable linear of the
pruned model, merged back into the weights afterwards, so the result is a plain (smaller) model.

`ig_lora` is CFSP's importance-guided variant (Wang et al. 2024, Sec. 3.4): blocks the coarse scores
rate more important get more trainable capacity. The paper allocates "training overhead" by the coarse
block importance without a closed formula we could follow exactly; we give block l the LoRA rank
max(1, round(lora_rank x z_l / mean z)) with z_l the coarse (post-sigmoid) block scores, so the mean
rank stays `lora_rank` and the trainable budget matches plain LoRA. With the `cfsp_coarse` allocator
its scores are reused; with any other allocator they are computed on the pruned model (one forward
pass over the calibration samples, a = 1).

Training data: windows of `recovery_seqlen` tokens at seeded random offsets of the calibration corpus
(the same text the method calibrated on; never the evaluation split), next-token loss, AdamW,
constant learning rate, `recovery_steps` steps of `recovery_batch` windows.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from bench.arch import arch_for
from bench.config import ConfigError

log = logging.getLogger(__name__)

RECOVERIES = ("none", "lora", "ig_lora")


@dataclass
class RecoveryOptions:
    """Method keys of the recovery stage; structured pruners' options inherit them."""

    recovery: str = "none"  # none | lora | ig_lora
    recovery_steps: int = 200
    recovery_batch: int = 1
    recovery_seqlen: int = 128
    recovery_lr: float = 2e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.recovery not in RECOVERIES:
            raise ConfigError(f"method.recovery={self.recovery!r} is not valid; allowed: {', '.join(RECOVERIES)}")
        for key in ("recovery_steps", "recovery_batch", "recovery_seqlen", "lora_rank"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}={getattr(self, key)} is out of range; allowed: >= 1")
        if not self.recovery_lr > 0:
            raise ConfigError(f"method.recovery_lr={self.recovery_lr} is out of range; allowed: > 0")


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


def recover(model: nn.Module, ids: torch.Tensor, options: RecoveryOptions, block_weights: Optional[list[float]],
            seed: int, device: str) -> tuple[nn.Module, dict]:
    """Fine-tune `model` with (IG-)LoRA on windows of the token stream `ids` (1, N); returns the merged
    model and a summary (ranks, losses, seconds)."""
    from peft import LoraConfig, get_peft_model

    from bench.data import calibration_samples

    start = time.perf_counter()
    arch = arch_for(model)
    ranks = lora_ranks(model, options.lora_rank, block_weights if options.recovery == "ig_lora" else None)
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=0.0,
                        target_modules=list(ranks),
                        rank_pattern={re.escape(name): r for name, r in ranks.items()}, bias="none")
    windows = calibration_samples(ids, options.recovery_steps * options.recovery_batch, options.recovery_seqlen,
                                  seed + 1)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config).to(device)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.recovery_lr)
    losses = []
    for step in tqdm(range(options.recovery_steps), desc=f"recovery ({options.recovery})", unit="step"):
        batch = windows[step * options.recovery_batch:(step + 1) * options.recovery_batch].to(device)
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
        "kind": options.recovery, "steps": options.recovery_steps, "batch": options.recovery_batch,
        "seqlen": options.recovery_seqlen, "lr": options.recovery_lr, "lora_alpha": options.lora_alpha,
        "ranks_per_block": [ranks[f"{arch.block_name(i)}.{arch.ffn_out}"] for i in range(len(arch.blocks(model)))],
        "trainable_params": sum(p.numel() for p in trainable),
        "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
        "seconds": time.perf_counter() - start,
    }
    log.info("recovery %s: loss %.3f -> %.3f in %.0f s", options.recovery, summary["loss_first"],
             summary["loss_last"], summary["seconds"])
    return merged, summary
