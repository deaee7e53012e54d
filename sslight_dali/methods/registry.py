"""The method registry: `@register_method("name", config=ItsConfig)` on an SSLMethod subclass.

A method's module declares the dataclass of its section and a `Config` subclass that holds it under
the method's name, with `method` defaulting to that name:

    @dataclass
    class DinoConfig(Config):
        method: str = "dino"
        dino: DinoCfg = field(default_factory=DinoCfg)

Registering the method is all it takes to use it: `method: name` becomes a valid config value, the
`name:` section a valid key (run_config.py loads a config as the subclass its `method` names), and
the trainer builds it, runs its schedules and checks its resume keys. The built-in methods register
when this package is imported (methods/__init__.py imports each module); a method defined anywhere
else registers the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..config import FIXED_FIELDS, Config
from ..settings import ConfigError
from .common import SSLMethod

METHODS: dict[str, type[SSLMethod[Any]]] = {}


def register_method(name: str, config: type[Config]) -> Callable[[type], type]:
    """Class decorator: `config` is the method's Config subclass, which adds the section `name`."""
    if name in FIXED_FIELDS or not name.isidentifier():
        raise ValueError(f"register_method({name!r}): the name must be an identifier and not one of {FIXED_FIELDS}")
    added = [f.name for f in dataclasses.fields(config)] if dataclasses.is_dataclass(config) else []
    if not (isinstance(config, type) and issubclass(config, Config)) or added[len(FIXED_FIELDS):] != [name] \
            or config.method != name:
        raise TypeError(f"register_method({name!r}): config must be a dataclass subclass of Config that adds "
                        f"the one section {name!r} and sets method = {name!r}, got {config!r}")

    def add(cls: type) -> type:
        if METHODS.get(name, cls) is not cls:
            raise ValueError(f"method {name!r} is already registered ({METHODS[name].__qualname__})")
        cls.name, cls.config = name, config
        METHODS[name] = cls
        return cls
    return add


def method_class(name: str) -> type[SSLMethod[Any]]:
    if name not in METHODS:
        raise ConfigError(f"method: {name!r} is not registered; choose one of {list(METHODS)}")
    return METHODS[name]
