"""Training configurations from a file and `section.key=value` overrides.

A file has the sections `[train]` (TrainConfig) and `[model]` (ModelConfig), in TOML or
JSON; a run's own `config.json` is such a file, so `mvpp train --config RUN/config.json`
trains that run again. Settings apply in order: the dataclasses' defaults, the file,
then each override.
"""

from __future__ import annotations

import json
import sys
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

from mvpp.predictor.config import InputSizes, ModelConfig
from mvpp.predictor.training import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTIONS = ("train", "model")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """The `train` and `model` sections of a TOML or JSON file (each may be absent)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold sections [train] and [model]")
    sections = {name: data.get(name) or {} for name in SECTIONS}
    if not any(name in data for name in SECTIONS):
        raise ConfigError(f"{path} has neither a [train] nor a [model] section")
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [{name}] must be a table of settings")
    return sections


def parse_override(text: str) -> tuple[str, str, Any]:
    """"model.alpha=0.7" -> ("model", "alpha", 0.7). Values are read as TOML values
    (numbers, true/false, [lists], "strings"); anything else is a string."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or section not in SECTIONS or not name:
        raise ConfigError(f"--set {text!r}: write SECTION.KEY=VALUE with SECTION one of {', '.join(SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def _tables(cls: type) -> set[str]:
    """The fields of a config dataclass that are config dataclasses themselves."""
    return {f.name for f in fields(cls) if f.default_factory is not MISSING and is_dataclass(f.default_factory)}


def build_configs(
    path: Path | None = None, overrides: list[str] | None = None
) -> tuple[TrainConfig, ModelConfig]:
    """TrainConfig and ModelConfig from the defaults, a file and overrides. Unknown keys
    are errors that name them."""
    sections = read_config_file(path) if path is not None else {name: {} for name in SECTIONS}
    train = dict(sections["train"])
    model = dict(sections["model"])
    for text in overrides or []:
        section, name, value = parse_override(text)
        target = train if section == "train" else model
        if section == "model" and name.partition(".")[0] in {"inputs", *(f.name for f in fields(InputSizes))}:
            raise ConfigError(f"--set {text!r}: {name} is set from the bank, not chosen")
        head, dot, rest = name.partition(".")
        if dot:  # a setting of a nested table, e.g. train.boost.bags
            owner = TrainConfig if section == "train" else ModelConfig
            table = target.setdefault(head, {})
            if head not in _tables(owner) or not isinstance(table, dict) or not rest:
                raise ConfigError(f"--set {text!r}: {section}.{head} is not a table of settings")
            table[rest] = value
        else:
            target[name] = value
    try:
        return TrainConfig.from_dict(train), ModelConfig.from_dict(model)
    except (TypeError, ValueError) as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"configuration{where}: {exc}") from exc
