"""Atomic checkpoints: a crash mid-write leaves the previous checkpoint intact.

Everything stored is loadable with `torch.load(weights_only=True)`: tensors, numbers, strings and
plain containers only (RNG states are converted to tensors/lists, the config to a dict).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write

LATEST = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit this run; the message names the file and why."""


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from e


def find_resume(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """'' -> None (fresh run); 'auto' -> the latest checkpoint in output_dir if any; else a path that must exist."""
    if not resume:
        return None
    if resume == "auto":
        p = Path(output_dir) / LATEST
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"train.resume: checkpoint not found: {p}")
    return p


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gauss": float(np_state[4])},
        "python": _to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gauss"]))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
