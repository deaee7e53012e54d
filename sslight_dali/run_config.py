"""A run's config: the typed schema of config.py with the section of the method that `method` names.

Each method's module declares its section and a `Config` subclass that holds it (methods/dino.py:
DinoConfig, with `dino`), registered with the method. This module sits above the method registry:
it merges the files and overrides (config.py), then builds the subclass that the merged `method`
names. Every registered method's section is a valid key in any config: a section of another method
(a checkpoint may hold all of them) is checked against its dataclass and dropped, so the resolved
config, `config show` and a run's config.yaml hold the method's own section only.
"""
from __future__ import annotations

import os
import typing
from typing import Any

from .config import (Config, ConfigError, DataCfg, all_keys, from_dict, parse_overrides, read_chain, suggest,
                     validate as validate_sections)
from .methods import METHODS


def config_class(method: Any) -> type[Config]:
    """The Config subclass of a registered method."""
    if method not in list(METHODS):
        raise ConfigError(f"method: {method!r} is not allowed; choose one of {list(METHODS)}")
    return METHODS[method].config


def method_sections() -> dict[str, type]:
    """{method name: the dataclass of its section}, for every registered method."""
    return {name: typing.get_type_hints(m.config)[name] for name, m in METHODS.items()}


def config_from_dict(data: Any, path: str = "") -> Config:
    """The Config subclass that data's `method` names (the default: Config.method), built from data;
    the sections of the other registered methods are checked and dropped."""
    method = data.get("method", Config.method) if isinstance(data, dict) else Config.method
    others = {name: section for name, section in method_sections().items() if name != method}
    return from_dict(config_class(method), data, path, others)


def config_keys() -> list[str]:
    """Every key a file or an override may set, in `config show` order: the sections of all registered
    methods after `model`."""
    keys = all_keys(Config)
    at = max(i for i, k in enumerate(keys) if k.split(".")[0] in ("method", "model")) + 1
    sections = [f"{name}.{k}" for name, section in method_sections().items() for k in all_keys(section)]
    return keys[:at] + sections + keys[at:]


def expand_key(key: str) -> str:
    """Full dotted key; a bare leaf name (`resume`, `epochs`) is accepted when it is unambiguous."""
    valid = config_keys()
    if key in valid:
        return key
    if "." not in key:
        matches = [k for k in valid if k.endswith("." + key)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ConfigError(f"key '{key}' is ambiguous: use one of {matches}")
    raise ConfigError(f"unknown key '{key}'{suggest(key, valid)}")


def _set_dotted(data: dict, key: str, value: Any) -> None:
    key = expand_key(key)
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- config YAML (over its `_base`) <- its recipe YAML (over its `_base`) <- command-line
    overrides. `path` and `data.recipe` are paths or shipped names (see config.find_file)."""
    data: dict = {}
    cfg_dir = None
    if path is not None:
        data, found = read_chain(path, "configs")
        cfg_dir = found.resolve().parent
    parsed = parse_overrides(list(overrides))
    for key, value in parsed:
        if expand_key(key) == "data.recipe":
            data.setdefault("data", {})["recipe"] = value
    recipe_ref = data.get("data", {}).get("recipe", DataCfg.recipe)
    if any(expand_key(k) == "data.recipe" for k, _ in parsed):
        data.pop("recipe", None)  # a new recipe file replaces the one embedded in a saved config
    if "recipe" not in data and recipe_ref:
        try:
            data["recipe"], _ = read_chain(recipe_ref, "pipelines", cfg_dir)
        except ConfigError as e:
            raise ConfigError(f"{path or 'defaults'}: data.recipe: {e}") from None
    for key, value in parsed:
        _set_dotted(data, key, value)
    for key, value in parsed:  # a bad override is the command line's fault, not the file's
        alone: dict = {}
        _set_dotted(alone, key, value)
        try:
            config_from_dict(alone)
        except ConfigError as e:
            raise ConfigError(f"override {key}={value!r}: {e}") from None
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks: those of the sections every run has (config.validate), then the method's own
    (SSLMethod.check_config)."""
    validate_sections(cfg)
    METHODS[cfg.method].check_config(cfg)
