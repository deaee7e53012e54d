"""Writing files so that a reader (or a crash) never sees half of one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, IO


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], None], fsync: bool = False) -> Path:
    """Write `data` (text, bytes, or a function that writes to a binary file) to a temporary file next
    to `path`, then rename it over `path`: on POSIX the rename is atomic, so readers see the old file or
    the new one, never a partial one. fsync=True also flushes the bytes to disk before the rename (for
    checkpoints, which must survive a power cut). The temporary file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def tmp_name(path: Path) -> Path:
    """The temporary name a write to `path` uses: hidden, per process, ending in .tmp (so a start-up
    clean-up can find the ones a killed process left)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
