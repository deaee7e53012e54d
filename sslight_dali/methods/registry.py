"""The method registry: `@register_method("name", config=SectionCfg)` on an SSLMethod subclass.

Registering a method is all it takes to use it: `method: name` becomes a valid config value, its
dataclass becomes the config section `name:` (config.py reads both from here), and the trainer
builds it, runs its schedules and checks its resume keys. The built-in methods register when this
package is imported; a method defined anywhere else registers the same way.
"""
from __future__ import annotations

import dataclasses

from ..config import FIXED_FIELDS, ConfigError

METHODS: dict[str, type] = {}


def register_method(name: str, config: type):
    """Class decorator: `config` is the dataclass of the method's section (`cfg.<name>`)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register_method({name!r}): config must be a dataclass, got {config!r}")
    if name in FIXED_FIELDS or not name.isidentifier():
        raise ValueError(f"register_method({name!r}): the name must be an identifier and not one of {FIXED_FIELDS}")

    def add(cls: type) -> type:
        if METHODS.get(name, cls) is not cls:
            raise ValueError(f"method {name!r} is already registered ({METHODS[name].__qualname__})")
        cls.name, cls.config = name, config
        METHODS[name] = cls
        return cls
    return add


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ConfigError(f"method: {name!r} is not registered; choose one of {list(METHODS)}")
    return METHODS[name]
