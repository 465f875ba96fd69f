"""What a cell will cost before it runs: `python run.py -m <sweep> plan=true` prints one row per cell and
runs none; a real sweep refuses a cell whose plan cannot fit (`bench.sweep`).

The model is built on the meta device from its architecture (no weights, no hub): a random model's
`model.architecture`, a local checkpoint's config.json, else the preset's public config shipped in
`conf/architectures.json`. From its exact parameters and block shapes the plan derives:

- placement: `in memory` (the whole model in host RAM, blocks computed on `device`), `streamed` (blocks
  read from the shards one at a time: model.stream=true, or auto over the host budget), and for the
  whole-model stages on GPUs (in-memory perplexity, zero-shot, speed) `1 GPU` or `dispatched over N`;
- peak GPU memory per device: the largest of one block + one calibration batch's activations + its
  Hessians (pruning), the whole model or one block + one window's hidden states (perplexity), its share of
  the model over the GPUs (zero-shot, speed); each whole-model stage with `FIT_MARGIN` for activations;
- peak host RAM: the model (or, streamed, its non-block parameters and two blocks) + the activations
  (every sample's block inputs and outputs stay on the host, on a GPU too) + Hessians, one window's logits
  and their log-softmax on the CPU + the tokenizer (`TOKENIZER_BYTES_PER_ENTRY`) + what
  a stage adds beside the model (a search's candidate or a resumable pass: the dense copy of one block;
  a structured cell's speed stage: the dense model loaded again beside the pruned one) + `BASE_RSS_GIB`
  for the interpreter and its libraries;
- disk: resume state (with resume_every_s set, the share of the pass's estimated time past the first
  resume_every_s of: what pruning changed in each block, `bench.resume.encode`, and the next block's
  inputs) and the checkpoint (save_dir, or the streamed output);
- tokens: calibration (nsamples x seqlen) and perplexity (windows x seqlen, per corpus);
- wall time from the throughput constants below (printed with the table): forward FLOPs 2 x params x
  tokens, SparseGPT's solve 2 x out x in^2 per linear, a search's candidates and LLM calls.

The grant is what the launcher asks for (`hydra.launcher`'s mem_gb, gpus_per_node and timeout_min under
hydra/launcher=slurm, which interpolate `model.resources`, with `GPU_GIB` per GPU), else this machine
(its job memory and visible GPUs). A cell that does not fit gets one line naming the knob that makes
it fit.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import transformers

from bench import streaming
from bench.compose import CONF_DIR
from bench.config import RunConfig
from bench.core.families import arch_for
from bench.core.perplexity import FIT_MARGIN
from bench.core.vocab import ConfigError, check_choice
from bench.data import CORPORA
from bench.models import byte_tokenizer
from methods import catalog, registry

ARCHITECTURES = CONF_DIR / "architectures.json"
GIB = 2**30
GPU_GIB = 80  # one GPU of a Slurm grant (A100-80GB, H100): model.resources.gpus says how many
BASE_RSS_GIB = 0.5  # python + torch + transformers imported, before any model (the tokenizer counted apart)
# a fast tokenizer in memory, per vocabulary entry (measured: Gemma-3-270M's 262k entries 328 MiB, 1313 bytes)
TOKENIZER_BYTES_PER_ENTRY = 1300
GPU_TFLOPS = 50.0  # effective half-precision forward throughput of one GPU
CPU_GFLOPS_PER_THREAD = 15.0  # effective fp32 forward throughput of one CPU thread
SOLVE_TFLOPS_GPU = 1.0  # SparseGPT's column-by-column solve is memory bound: far below the forward's rate
SOLVE_GFLOPS_PER_THREAD = 5.0
LLM_SECONDS_PER_CALL = 20.0  # one answer of a search's LLM
FULL_SPLIT_TOKENS = {"wikitext2": 340_000, "ptb": 85_000, "pydoc": 600_000}  # eval.ppl.max_windows=null
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Grant:
    mem_bytes: int
    gpus: int
    gpu_bytes: int
    timeout_min: Optional[int]
    source: str  # "model.resources" or "this machine"


def grant(launcher: Optional[dict]) -> Grant:
    """What the cell gets: the Slurm job its launcher node asks for (`hydra.launcher`, resolved: the
    model's `model.resources` unless given there), else the machine the sweep runs on."""
    if launcher is not None:
        return Grant(int(launcher["mem_gb"]) * GIB, int(launcher.get("gpus_per_node") or 0), GPU_GIB * GIB,
                     launcher.get("timeout_min"), "hydra.launcher")
    gpus = torch.cuda.device_count()
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if gpus else 0
    return Grant(streaming.job_memory_bytes(), gpus, gpu_bytes, None, "this machine")


def architecture(cfg: RunConfig) -> dict:
    """The transformers config kwargs (with model_type) of the cell's model, from no weights and no hub."""
    model = cfg.model
    if model.path is not None:
        config = Path(model.path).expanduser() / "config.json"
        if not config.is_file():
            raise ConfigError(f"model.path={model.path!r} has no config.json for the plan; allowed: a local checkpoint")
        return json.loads(config.read_text())
    if model.source == "random":
        return {**model.architecture, "vocab_size": len(byte_tokenizer())}
    shipped = json.loads(ARCHITECTURES.read_text())
    if model.name not in shipped:
        raise ConfigError(f"model={model.name!r} has no architecture in {ARCHITECTURES.name} for the plan; allowed: "
                          f"{', '.join(sorted(k for k in shipped if not k.startswith('_')))}, a random model, or "
                          f"model.path=<local checkpoint>")
    return shipped[model.name]


@dataclass
class Shape:
    params: int
    block_params: int  # the largest block's
    blocks: int
    hidden: int
    linears: list[tuple[int, int]]  # (in, out) of every prunable linear of the largest block
    ffn_params: int  # the FFN linears' weights over all blocks: what structured pruning removes a share of
    vocab: int


def shape(arch_kwargs: dict) -> Shape:
    kwargs = {k: v for k, v in arch_kwargs.items() if not k.startswith("_")}
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    arch = arch_for(model)
    blocks = arch.blocks(model)
    sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    largest = blocks[sizes.index(max(sizes))]
    linears = [(layer.in_features, layer.out_features) for layer in arch.linears(largest).values()]
    ffn = sum(block.get_submodule(name).weight.numel() for block in blocks for name in (*arch.ffn_in, arch.ffn_out))
    return Shape(sum(p.numel() for p in model.parameters()), max(sizes), len(blocks), config.hidden_size, linears,
                 ffn, config.vocab_size)


@dataclass
class Plan:
    placement: str
    params: int
    gpu_peak: int  # bytes per device; 0 on the CPU
    host_peak: int
    disk_resume: int
    disk_checkpoint: int
    calib_tokens: int
    eval_tokens: int
    seconds: float
    fits: bool
    knob: str  # why it does not fit and what makes it fit; "" when it fits


def _eval_windows(cfg: RunConfig, dataset: str) -> int:
    ppl = cfg.eval.ppl
    count = FULL_SPLIT_TOKENS.get(dataset, 300_000) // ppl.seqlen
    cap = CORPORA[dataset].eval_windows if dataset in CORPORA else None
    for limit in (cap, ppl.max_windows):
        if limit is not None:
            count = min(count, limit)
    return count


def plan_cell(cfg: RunConfig, granted: Grant) -> Plan:
    s = shape(architecture(cfg))
    size = BYTES[cfg.model.dtype]
    weights, block = s.params * size, s.block_params * size
    calib = cfg.data.calib
    calib_tokens = calib.nsamples * calib.seqlen
    windows = {name: _eval_windows(cfg, name) for name in (cfg.eval.ppl.datasets if cfg.eval.ppl else [])}
    eval_tokens = sum(count * cfg.eval.ppl.seqlen for count in windows.values())
    # the engine holds every sample's block inputs and outputs on the host, and one batch of them on a GPU
    activations = 2 * calib_tokens * s.hidden * size
    eval_activations = 2 * max(windows.values(), default=0) * (cfg.eval.ppl.seqlen if cfg.eval.ppl else 0) * \
        s.hidden * size
    method = cfg.method
    pruner = registry.PRUNERS[method.pruner]
    hessians = sum(n_in * n_in * 4 for n_in, _ in s.linears) if pruner.stats_level == "full" and not method.dense \
        else 0
    structured = pruner.structured and not method.dense
    search = registry.ALLOCATORS[method.allocator].needs_search
    resumable = not (cfg.resume_every_s is None or method.dense)
    on_gpu = cfg.device == "cuda"

    checkpoint_path = Path(cfg.model.path).expanduser() if cfg.model.path else None
    on_disk = (streaming.checkpoint_bytes(checkpoint_path) if checkpoint_path else 0) or weights
    if cfg.model.stream == "auto":
        budget = int(cfg.model.host_memory_gb * GIB) if cfg.model.host_memory_gb is not None else granted.mem_bytes // 2
        streamed = checkpoint_path is not None and on_disk > budget
    else:
        streamed = bool(cfg.model.stream)

    # a structured pruner removes its share of the FFN channels physically; the rest keep their zeros
    pruned = weights - int(cfg.sparsity * s.ffn_params * size) if structured else weights
    # one window's fp32 logits and their log-softmax on the CPU (a 262k vocabulary: 0.25 GiB at seqlen 128)
    logits = 2 * cfg.eval.ppl.seqlen * s.vocab * 4 if cfg.eval.ppl and not on_gpu else 0
    host = BASE_RSS_GIB * GIB + s.vocab * TOKENIZER_BYTES_PER_ENTRY + hessians * (not on_gpu) + activations + \
        eval_activations + logits
    if streamed:
        host += weights - s.blocks * block + 2 * block
    else:  # the speed stage holds the pruned model and the dense one loaded again
        speed_stage = weights + pruned if structured and cfg.eval.speed is not None else 0
        host += max(weights + block * (search or resumable), speed_stage)
    gpu, placement = 0, "streamed" if streamed else "in memory"
    if on_gpu:
        one_gpu = granted.gpu_bytes
        prune_peak = block + activations * calib.batch // max(calib.nsamples, 1) + hessians
        whole_fits = not streamed and weights * FIT_MARGIN < one_gpu
        ppl_peak = weights * FIT_MARGIN if whole_fits else block + 2 * cfg.eval.ppl.seqlen * s.hidden * size \
            if cfg.eval.ppl else 0
        gpu = max(prune_peak, ppl_peak)
        needs_whole = not streamed and (cfg.eval.zeroshot is not None or (structured and cfg.eval.speed is not None))
        if needs_whole:
            if whole_fits and granted.gpus <= 1:
                placement += ", 1 GPU"
            else:
                share = weights * FIT_MARGIN / max(granted.gpus, 1)
                gpu = max(gpu, int(share))
                placement += f", dispatched over {granted.gpus}"

    resume = 0
    if resumable and not streamed:
        # blocks are written every resume_every_s: a pass shorter than that writes none, a long one nearly all
        every, prune_seconds = cfg.resume_every_s, _seconds(cfg, s, calib_tokens, 0, on_gpu, pruner, False)
        kept = 1.0 if every <= 0 else max(0.0, 1 - every / max(prune_seconds, 1e-9))
        changed, inputs = _changed_bytes(cfg, s, structured), activations // 2
        # the next block's inputs are on disk beside every saved block but the last one's
        resume = int(max(changed * min(kept, 1 - 1 / s.blocks) + inputs, changed * kept)) if kept > 0 else 0
    if cfg.save_dir is None and not streamed:
        saved = 0
    elif cfg.save_format == "bitmask":
        saved = int(weights * (1 - cfg.sparsity)) + s.params // 8
    else:
        saved = pruned

    seconds = _seconds(cfg, s, calib_tokens, eval_tokens, on_gpu, pruner, search)
    knob = _knob(cfg, granted, s, streamed, checkpoint_path, host, gpu, seconds, activations, block, hessians,
                 weights, structured, search)
    return Plan(placement, s.params, gpu, int(host), resume, saved, calib_tokens, eval_tokens, seconds, not knob, knob)


def _changed_bytes(cfg: RunConfig, s: Shape, structured: bool) -> int:
    """What a resume keeps of the pruned blocks (`bench.resume.encode`): the FFN linears at their pruned
    width (structured), the mask and kept values of every pruned linear (kept weights changed: SparseGPT,
    quantization), else its mask alone (1 bit per weight)."""
    size = BYTES[cfg.model.dtype]
    if structured:
        return int((1 - cfg.sparsity) * s.ffn_params * size)
    linear_params = s.blocks * sum(n_in * n_out for n_in, n_out in s.linears)
    pruner = catalog.build(cfg.method).pruner
    if pruner.changes_kept or pruner.quantizes:
        return int(linear_params * min(size, (1 - cfg.sparsity) * size + 1 / 8))
    return linear_params // 8


def _seconds(cfg, s: Shape, calib_tokens, eval_tokens, on_gpu, pruner, search) -> float:
    forward = (GPU_TFLOPS * 1e12) if on_gpu else CPU_GFLOPS_PER_THREAD * 1e9 * cfg.threads
    solve = (SOLVE_TFLOPS_GPU * 1e12) if on_gpu else SOLVE_GFLOPS_PER_THREAD * 1e9 * cfg.threads
    flops = 2 * s.params * (calib_tokens + eval_tokens)
    seconds = flops / forward
    if pruner.stats_level == "full" and not cfg.method.dense:
        seconds += s.blocks * sum(2 * n_out * n_in * n_in for n_in, n_out in s.linears) / solve
    if search:
        options = cfg.method.allocator_options
        population, generations = getattr(options, "population", 0), getattr(options, "generations", 0)
        candidates = 1 + population + generations * (population - getattr(options, "elites", 0))
        tokens = (getattr(options, "fitness_nsamples", 0) + getattr(options, "fitness_windows", 0)) * \
            getattr(options, "fitness_seqlen", 0)
        seconds += candidates * 2 * s.params * tokens / forward
        if getattr(options, "operators", "llm") == "llm":
            seconds += candidates * LLM_SECONDS_PER_CALL
    return seconds


def _knob(cfg, granted: Grant, s: Shape, streamed, checkpoint_path, host, gpu, seconds, activations, block,
          hessians, weights, structured, search) -> str:
    """"" when the cell fits its grant, else what is over and the one change that makes it fit."""
    mem, where = granted.mem_bytes, granted.source
    if host > mem:
        over = f"host RAM {host / GIB:.1f} GiB > {mem / GIB:.1f} GiB ({where})"
        if activations > host - mem:  # fewer samples fit where the model does
            per_sample = 2 * cfg.data.calib.seqlen * s.hidden * BYTES[cfg.model.dtype]
            fit = int((mem - (host - activations)) // per_sample)
            return f"{over}: data.calib.nsamples={fit} (every sample's block inputs and outputs stay on the host)"
        if not streamed:
            pruned = weights - int(cfg.sparsity * s.ffn_params * BYTES[cfg.model.dtype])
            if structured and cfg.eval.speed is not None and host - pruned + block * search <= mem:
                return f"{over}: eval.speed=null (the speed stage loads the dense model beside the pruned one)"
            if checkpoint_path is None:
                return f"{over}: model.path=<local checkpoint> model.stream=true (blocks read from its shards)"
            return f"{over}: model.stream=true (blocks read from the shards one at a time)"
        return f"{over}: model.resources.mem_gb={math.ceil(host / GIB)}"
    if cfg.device == "cuda":
        if granted.gpus < 1:
            return f"device=cuda but {where} grants no GPU: model.resources.gpus=1 or device=cpu"
        one = granted.gpu_bytes
        if gpu > one:
            over = f"GPU memory {gpu / GIB:.1f} GiB > {one / GIB:.0f} GiB per GPU ({where})"
            calib = cfg.data.calib
            per_sample = 2 * calib.seqlen * s.hidden * BYTES[cfg.model.dtype]
            if block + calib.batch * per_sample + hessians > one and calib.batch > 1:
                fit = max(int((one - block - hessians) // per_sample), 1)
                return f"{over}: data.calib.batch={fit} (one batch of calibration activations is on the GPU)"
            return f"{over}: model.resources.gpus={math.ceil(weights * FIT_MARGIN / one)}"
    if granted.timeout_min is not None and seconds / 60 > granted.timeout_min:
        if cfg.device == "cpu" and granted.gpus:
            return f"estimated {seconds / 3600:.1f} h on the CPU > model.resources.timeout_min=" \
                   f"{granted.timeout_min}, and the job has {granted.gpus} GPU(s): device=cuda"
        return f"estimated {seconds / 3600:.1f} h > model.resources.timeout_min={granted.timeout_min}: " \
               f"model.resources.timeout_min={math.ceil(seconds / 60 * 1.2)}" + \
               (" or a smaller method.population" if search else "")
    return ""


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}" if value else "-"


def _tokens(value: int) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e5 else str(value)


def table(rows: list[tuple[str, Plan]], granted: list[Grant]) -> str:
    """The plan of a sweep as printed: a header with the constants, one row per cell, then one line per
    cell that does not fit."""
    lines = [f"plan: no cell runs. Constants: forward {GPU_TFLOPS:g} TFLOP/s per GPU, "
             f"{CPU_GFLOPS_PER_THREAD:g} GFLOP/s per CPU thread; SparseGPT solve {SOLVE_TFLOPS_GPU:g} TFLOP/s per "
             f"GPU, {SOLVE_GFLOPS_PER_THREAD:g} GFLOP/s per thread; {LLM_SECONDS_PER_CALL:g} s per search LLM call; "
             f"{GPU_GIB} GiB per Slurm GPU; {BASE_RSS_GIB} GiB base RSS; {TOKENIZER_BYTES_PER_ENTRY} bytes per "
             f"tokenizer entry; FIT_MARGIN {FIT_MARGIN}",
             "| cell | placement | params | GPU GiB/device | host GiB | resume GiB | checkpoint GiB | calib tokens "
             "| eval tokens | est. time | grant | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (cell, plan), given in zip(rows, granted):
        grant_text = f"{given.mem_bytes / GIB:.0f} GiB, {given.gpus} GPU ({given.source})"
        lines.append(f"| {cell} | {plan.placement} | {_count(plan.params)} | {_gib(plan.gpu_peak)} | "
                     f"{_gib(plan.host_peak)} | {_gib(plan.disk_resume)} | {_gib(plan.disk_checkpoint)} | "
                     f"{_tokens(plan.calib_tokens)} | {_tokens(plan.eval_tokens)} | {_duration(plan.seconds)} | "
                     f"{grant_text} | {'yes' if plan.fits else 'no'} |")
    lines += [f"does not fit: {cell}: {plan.knob}" for cell, plan in rows if not plan.fits]
    return "\n".join(lines)


def _count(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_mode(value: object) -> bool:
    """The top-level `plan` key: true prints the plan and runs nothing."""
    check_choice("plan", value, (True, False))
    return bool(value)


def sweep_plan(cells: list[tuple[str, RunConfig, Optional[dict]]]) -> tuple[str, list[str]]:
    """The printed plan of `cells` ((label, config, its Slurm launcher node or None) each) and the one-line
    refusal of each cell that cannot fit. A cell whose architecture the plan cannot know (a hub id with no
    shipped config) is listed as not planned and never refused."""
    rows, grants, refusals, unknown = [], [], [], []
    for label, cfg, launcher in cells:
        granted = grant(launcher)
        try:
            planned = plan_cell(cfg, granted)
        except (ConfigError, ValueError, KeyError, TypeError, OSError) as exc:  # a config the plan cannot read
            unknown.append(f"not planned: {label}: {exc}")
            continue
        rows.append((label, planned))
        grants.append(granted)
        if not planned.fits:
            refusals.append(f"cell [{label}] cannot fit: {planned.knob}")
    return "\n".join([table(rows, grants), *unknown]), refusals
