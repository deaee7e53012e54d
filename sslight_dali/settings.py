"""What config fields are declared with: ConfigError and the field helpers `setting` and `setting_list`.

Below config.py, so that the op table (augment.py) declares its ops' knobs with them and config.py
composes the recipe from those declarations.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def setting(default: Any, lo: float | None = None, hi: float | None = None, help: str = "") -> Any:
    """A config field with an allowed range [lo, hi] (checked on load) and a help text."""
    return field(default=default, metadata={"range": (lo, hi), "help": help})


def setting_list(default: list, help: str = "") -> Any:
    """A list-valued config field (a scalar given for it becomes a one-item list)."""
    return field(default_factory=lambda: list(default), metadata={"help": help})
