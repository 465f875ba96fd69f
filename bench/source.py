"""Where a cell's model lives while the recipe (`bench.pipeline`) works on it. `ModelSource` is what the
recipe asks of it; `InMemory` holds the whole model, `bench.streaming.Streamed` reads its blocks from
shards when the engine reaches them. What differs between the two (how blocks are pruned, how
perplexity is measured, where the checkpoint is written, what a streamed cell cannot do) lives here and
there, never in branches of the recipe.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional

import torch

from bench import llm, models, resume, speed, zeroshot
from bench.cache import CellCache
from bench.config import RunConfig
from bench.core import families, perplexity
from bench.core.records import Result
from bench.core.vocab import ConfigError
from bench.observer import CellObserver
from methods import lifecycle, recovery

# A structured method whose channel rounding moves the achieved sparsity further than this from the
# target gets a warning in its result (and so in the table's footnotes).
STRUCTURED_TOLERANCE = 0.05


class ModelSource(ABC):
    """One cell's model, from loading to its evaluation. Each step records in `result` what only it knows.
    A source that cannot recover or run zero-shot refuses the cell when it is opened, before any work."""

    measures_speed = False  # a structured cell's speed-up against the dense model (`speed`)

    def __init__(self, cfg: RunConfig, result: Result, observer: CellObserver, save_to: Optional[Path]):
        self.cfg, self.result, self.observer, self.save_to = cfg, result, observer, save_to

    @abstractmethod
    def load(self):
        """Stage `load`; returns the tokenizer."""

    @abstractmethod
    def prune(self, method, samples: torch.Tensor, shared: CellCache) -> lifecycle.PruneReport:
        """Stage `prune` at the cell's sparsity: records its timings and `result.sparsity`."""

    @abstractmethod
    def save(self, tokenizer) -> None:
        """Write the checkpoint to `save_to` and record where (`result.saved_to`)."""

    @abstractmethod
    def perplexity(self, windows: torch.Tensor, desc: str, shared: CellCache) -> float:
        """The model's perplexity on `windows`."""

    def recover(self, windows: torch.Tensor, samples: torch.Tensor, block_weights) -> None:
        """Recovery (`cfg.recovery`) on `windows`: records `result.recovery` and its time."""
        raise NotImplementedError

    def zeroshot(self, tokenizer) -> dict:
        """The zero-shot scores of `cfg.eval.zeroshot`."""
        raise NotImplementedError

    def speed(self) -> dict:
        """Tokens/s of the pruned model against the dense one."""
        raise NotImplementedError


class InMemory(ModelSource):
    """The whole model in host (or device) memory: everything the recipe can do, it can."""

    def __init__(self, cfg: RunConfig, result: Result, observer: CellObserver, save_to: Optional[Path],
                 out_dir: Path, config_hash: str):
        super().__init__(cfg, result, observer, save_to)
        self.out_dir, self.config_hash = out_dir, config_hash
        # the zero-shot tasks and their data before the model and the prune: unreachable data fails in one line
        self.tasks = zeroshot.load_tasks(cfg.eval.zeroshot) if cfg.eval.zeroshot is not None else None
        self.model = self.dense = None

    def load(self):
        with self.observer.stage("load"):
            self.model, tokenizer = models.load(self.cfg.model)
        _check_positions(self.model, self.cfg)
        _check_finite(self.model, "after loading")
        return tokenizer

    def prune(self, method, samples: torch.Tensor, shared: CellCache) -> lifecycle.PruneReport:
        cfg, result, model = self.cfg, self.result, self.model
        if method.pruner.structured:  # FFN channels removed physically: measured against the dense widths
            self.dense = families.ffn_sizes(model), families.parameter_count(model)
            self.measures_speed = cfg.eval.speed is not None
        self.observer.enter("prune")
        store = None if cfg.resume_every_s is None else resume.ResumeState(
            self.out_dir, self.config_hash, cfg.device, cfg.resume_every_s, resume.samples_digest(samples),
            resume.files_signature(cfg.model.path))
        report = lifecycle.prune(model, method, samples, cfg.sparsity, cfg.device, cache=shared,
                                 make_llm=lambda chat: llm.make_backend(chat, device=cfg.device),
                                 on_step=self.observer.step, batch=cfg.data.calib.batch, resume=store)
        if store is not None:
            result.warnings += store.warnings
        if report.resumed_from is not None:
            result.process["resumed_from_block"] = report.resumed_from
        self.observer.timed(report.seconds)
        _check_finite(model, f"after pruning with {cfg.method.name}")
        if self.dense is not None:
            result.sparsity = {"target": cfg.sparsity, **families.structured_sparsity(model, *self.dense),
                               "allocated": report.rates}
            _check_structured(result, cfg.sparsity)
        else:
            overall, per_layer = families.measured_sparsity(model)
            result.sparsity = {"target": cfg.sparsity, "measured": overall, "allocated": report.rates,
                               "per_layer": per_layer}
        return report

    def recover(self, windows: torch.Tensor, samples: torch.Tensor, block_weights) -> None:
        cfg = self.cfg
        self.model, self.result.recovery = recovery.recover(self.model, windows, samples, cfg.recovery, block_weights,
                                                            cfg.seed, cfg.device)
        self.observer.timed({"recovery": self.result.recovery["seconds"]})

    def save(self, tokenizer) -> None:
        with self.observer.stage("save"):
            self.result.saved_to = str(models.save(self.model, tokenizer, self.save_to, self.result,
                                                   self.result.config, self.cfg.save_format))

    def perplexity(self, windows: torch.Tensor, desc: str, shared: CellCache) -> float:
        cfg = self.cfg

        def evaluate() -> float:
            return perplexity.perplexity(self.model, windows, cfg.device, desc=desc, layerwise=cfg.eval.ppl.layerwise,
                                         on_step=self.observer.step, batch=cfg.eval.ppl.batch)
        # the dense model's ppl is the same in every cell
        return shared.dense_ppl(windows, cfg.device, evaluate) if cfg.method.dense else evaluate()

    def zeroshot(self, tokenizer) -> dict:
        cfg = self.cfg
        return zeroshot.evaluate(self.model, tokenizer, cfg.eval.zeroshot, cfg.device, cfg.seed, self.out_dir,
                                 self.tasks)

    def speed(self) -> dict:
        # the dense model loaded again from its source, not a copy held through the prune and evaluation:
        # at 70B that copy is 128 GiB beside the model (and a search's work) from the first stage on
        dense, _ = models.load(self.cfg.model)
        measured = speed.measure(dense, self.model, self.cfg.eval.speed, self.cfg.device, self.cfg.seed,
                                 on_step=self.observer.step)
        if not measured["single_device"]:
            devices = {name: sorted(set(where.values())) for name, where in measured["device_map"].items()}
            self.result.warnings.append(f"speed-ups measured with the models dispatched (dense on {devices['dense']}, "
                                        f"pruned on {devices['pruned']}), not whole on one device as the papers "
                                        f"measure")
        self.result.warnings += speed.unsteady(measured)
        return measured


FINITE_CHUNK = 1 << 22  # elements checked at once


def _finite(tensor: torch.Tensor) -> bool:
    # a chunk at a time: torch.isfinite of a whole tensor holds its abs() and two masks, 1.5 times it (a
    # Gemma-3-270M cell peaked 1.3 GiB over its plan on its 262k-token embedding, twice)
    return all(bool(torch.isfinite(chunk).all()) for chunk in tensor.detach().reshape(-1).split(FINITE_CHUNK))


def _check_finite(model, when: str) -> None:
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and tensor.device.type != "meta" and not _finite(tensor)]
    if bad:
        raise FloatingPointError(f"{len(bad)} tensors hold NaN or inf {when}: {', '.join(bad[:5])}"
                                 + (" ..." if len(bad) > 5 else ""))


def _check_positions(model, cfg: RunConfig) -> None:
    """The windows cut for calibration, evaluation and recovery must fit the checkpoint's position table, and
    so must model.seqlen where it is the model's own (a preset's); model.path's context is its config's."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    used = {"data.calib.seqlen": cfg.data.calib.seqlen, "eval.ppl.seqlen": cfg.eval.ppl.seqlen if cfg.eval.ppl else 1,
            "recovery.seqlen": cfg.recovery.seqlen if cfg.recovery.enabled else 1}
    if cfg.model.path is None:
        used = {"model.seqlen": cfg.model.seqlen, **used}
    for key, seqlen in used.items():
        if limit is not None and seqlen > limit:
            raise ConfigError(f"{key}={seqlen} is out of range; allowed: 1..{limit} (the max_position_embeddings "
                              f"of the loaded checkpoint of model {cfg.model.name})")


def _check_structured(result: Result, target: float) -> None:
    achieved = result.sparsity["measured"]
    if abs(achieved - target) > STRUCTURED_TOLERANCE:
        result.warnings.append(f"structured pruning removed {achieved:.1%} of FFN channels for a target of "
                               f"{target:.1%} (channel rounding, e.g. method.round_to; tolerance "
                               f"{STRUCTURED_TOLERANCE:.0%})")
