"""Composing a config from conf/ and the command line's unknown keys, without the harness.

`run.py` checks its command line here before Hydra runs (Hydra's own error for an unknown key suggests
`+key=`, which adds a key prunebench then refuses), and torch, transformers and the rest of the harness
would add seconds to every start, a sweep's first console line included: this module imports Hydra and
the vocabulary alone.
"""
from __future__ import annotations

import difflib
import re
import string
from pathlib import Path
from typing import Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from bench.core.vocab import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] = (), with_hydra: bool = False) -> DictConfig:
    """The config `python run.py <overrides>` would run, composed from conf/ (for tests and scripts);
    `with_hydra` keeps the `hydra` node (launcher, sweep dirs). An override Hydra cannot apply (an
    unknown preset, bad syntax) is a one-line ConfigError."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
        except HydraException as exc:
            message = str(exc).split("\nConfig search path")[0]  # the rest lists Hydra's own search path
            unknown = _UNKNOWN_KEY.search(message)
            if unknown is None:
                raise ConfigError(" ".join(message.split())) from None
        # Hydra suggests `+key=`, which adds a key prunebench then refuses: name the keys it has instead
        key = unknown.group(1)
        rest = [o for o in overrides if o.lstrip("+~").split("=")[0] != key]
        try:
            known = _dotted(OmegaConf.to_container(hydra_compose(config_name="config", overrides=rest)))
        except HydraException:
            known = []
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        raise ConfigError(f"{key} is not a known key" + (f"; did you mean {close[0]}?" if close else "")) from None


_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")


def unknown_key(arguments: list[str]) -> Optional[str]:
    """The one-line error of a command line's first unknown key (with a "did you mean"), or None; a sweep
    axis (`method=dense,wanda`) is checked at its first value; Hydra's own flags and keys are left to it."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in arguments):
        return None  # --help, --cfg, --info ...: Hydra's own, which a composed config would only slow
    overrides = []
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if argument.startswith("-") or not equals or key.lstrip("+~").startswith("hydra."):
            continue
        first = value if value.startswith(("[", "{", "'", '"')) else value.split(",")[0]
        overrides.append(f"{key}={first}")
    try:
        compose(overrides)
    except ConfigError as exc:
        return str(exc) if "is not a known key" in str(exc) else None
    return None


def eval_sweep(arguments: list[str]) -> Optional[str]:
    """The one-line refusal of a multirun's `eval=ppl,zeroshot`, or None. `eval` is the one group whose
    presets are meant to be combined (`eval=[ppl,zeroshot]`), and Hydra reads the comma without brackets
    as a sweep axis: every cell would run twice, one evaluation each, and nothing would say so.
    `eval=choice(ppl,zeroshot)` still sweeps them for whoever means it."""
    if not any(a in ("-m", "--multirun") for a in arguments):
        return None  # Hydra itself refuses a comma outside a multirun
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if equals and key.lstrip("+~") == "eval" and "," in value and not value.startswith(("[", "choice(")):
            return (f"eval={value} would sweep over {len(value.split(','))} evaluations, one per cell; "
                    f"to run them all in every cell write eval=[{value}] "
                    f"(to sweep them on purpose: eval=choice({value}))")
    return None


def keys_of_swept_groups(arguments: list[str]) -> list[str]:
    """A multirun's command line with each `group.key=value` of a swept group (`method=a,b`, or an
    experiment's `hydra.sweeper.params`) that the group's default preset lacks made `++group.key=value`:
    Hydra composes a sweep's base config with the default preset first, and refused such a key though every
    swept preset has it. Each cell then overrides the key its preset has; a cell whose preset lacks it is
    refused by validation, naming that cell."""
    if not any(a in ("-m", "--multirun") for a in arguments):
        return arguments
    parsed = [(a, *a.partition("=")) for a in arguments]
    plain = [(a, key, value) for a, key, equals, value in parsed if equals and not a.startswith(("+", "~", "-"))]
    grouped = [(a, key) for a, key, _ in plain if "." in key and not key.startswith("hydra.")]
    if not grouped:
        return arguments
    swept = {key for _, key, value in plain
             if "." not in key and "," in value and not value.startswith(("[", "{", "'", '"'))}
    try:  # the sweep's base, as Hydra composes it: without the swept values, an experiment's own sweep included
        base = compose([a for a, key, _ in plain if "." not in key and key not in swept], with_hydra=True)
    except ConfigError:
        return arguments  # Hydra says what is wrong with the command line
    swept |= {key for key in (base.hydra.sweeper.params or {}) if "." not in key}
    missing = object()
    rewrite = {a for a, key in grouped
               if key.split(".")[0] in swept and OmegaConf.select(base, key, default=missing) is missing}
    return [f"++{a}" if a in rewrite else a for a in arguments]


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    """Every key of a nested config, dotted (`eval.ppl.seqlen`)."""
    keys = []
    for key, value in tree.items():
        keys.append(prefix + str(key))
        if isinstance(value, dict):
            keys += _dotted(value, f"{prefix}{key}.")
    return keys


_HELP_FIELDS = {"APP_CONFIG_GROUPS", "CONFIG"}


def app_help(overrides: list[str]) -> Optional[str]:
    """`python run.py --help`'s text as Hydra writes it from conf/hydra/help, or None where the template
    asks for more than the config groups and the config (a user's own hydra/help: Hydra answers).
    Hydra fills every field of its template whatever the template uses, listing the groups of the
    whole search path twice, about a config repository per group: that was most of --help's time."""
    cfg = compose(overrides, with_hydra=True)
    template = string.Template(cfg.hydra.help.template)
    if {match[1] or match[2] for match in template.pattern.findall(template.template)} - {""} - _HELP_FIELDS:
        return None
    groups = sorted(path.parent.relative_to(CONF_DIR).as_posix() for path in CONF_DIR.rglob("*.yaml")
                    if path.parent != CONF_DIR and path.relative_to(CONF_DIR).parts[0] != "hydra")
    lines = "".join(f"{group}: {', '.join(sorted(p.stem for p in (CONF_DIR / group).glob('*.yaml')))}\n"
                    for group in dict.fromkeys(groups))
    with open_dict(cfg):
        del cfg["hydra"]
    return template.substitute(APP_CONFIG_GROUPS=lines, CONFIG=OmegaConf.to_yaml(cfg))
