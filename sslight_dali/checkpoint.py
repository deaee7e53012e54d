"""Checkpoints that survive crashes, full disks and bit rot; the run directory's file layout.

Layout of a run directory:
- `checkpoint_step{N:08d}.pt`: one per save; the newest `train.keep_last` are kept.
- `checkpoint.pt`: the newest of them (a hard link, so no extra space; a copy where links fail).
- `checkpoint_epoch{E:04d}.pt`: every `train.keep_every_epochs` epochs, kept for good.
Each file is written to a temporary name, fsynced and renamed: a crash mid-write leaves the previous
files intact (and a `.*.tmp` that the next start removes). Each stores a sha256 of its content
(`checksum`: every tensor's bytes, every number and string, in order), verified on load, so a file
damaged after it was written (zeroed blocks, a copy cut short) is refused instead of loaded; files
written before checksums existed still load. `resume=auto` takes the newest file that verifies and
logs each one it skipped and why.

Everything stored is loadable with `torch.load(weights_only=True)`: tensors, numbers, strings and
plain containers only (RNG states are converted to tensors/lists, the config to a dict).
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
import shutil
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write, tmp_name

log = logging.getLogger("sslight")

LATEST = "checkpoint.pt"
STEP_RE = re.compile(r"^checkpoint_step(\d+)\.pt$")
EPOCH_RE = re.compile(r"^checkpoint_epoch(\d+)\.pt$")
TMP_RE = re.compile(r"^\.checkpoint.*\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, written or does not fit this run; the message names the file and why."""


def step_name(step: int) -> str:
    return f"checkpoint_step{step:08d}.pt"


def epoch_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pt"


# --------------------------------------------------------------------------------------------
# Content checksum
# --------------------------------------------------------------------------------------------
def content_digest(obj) -> str:
    """sha256 of a checkpoint's content: structure, keys, numbers, strings and every tensor's bytes,
    in order. Computed on the objects, not the file, so it needs no second file or header and the
    file stays a plain torch checkpoint."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, dict):
            h.update(b"{%d" % len(x))
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(b"[%d" % len(x))
            for v in x:
                walk(v)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(where: str) -> None:
    """Fault injection for the test suite (never set in normal use): SSLIGHT_FAULT=<where>[:<n>[:<SIG>]]
    sends this process signal SIG (default KILL, as a node failure would) the n-th time (default 1st)
    it reaches `where`: "step" (after an optimizer step), "checkpoint_write" (inside a checkpoint
    write, data written but not yet renamed), "checkpoint_link" (step file written, checkpoint.pt not
    yet pointed at it)."""
    spec = os.environ.get("SSLIGHT_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != where:
        return
    count = _FAULT_COUNTS[where] = _FAULT_COUNTS.get(where, 0) + 1
    nth, _, sig = rest.partition(":")
    if count == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    def write(f):
        torch.save(obj, f)
        f.flush()
        fault_point("checkpoint_write")  # the fault suite kills here: a written but not yet renamed file
    atomic_write(path, write, fsync=True)


def _link_atomic(src: Path, dst: Path) -> None:
    """dst becomes the same file as src (a hard link; a copy where the file system has none), atomically."""
    tmp = tmp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def first_line(e: BaseException) -> str:
    """An exception's message in one line (torch's can run to many), or its type if it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_error(output_dir: Path, e: BaseException) -> CheckpointError:
    why = getattr(e, "strerror", None) or first_line(e)
    if "enforce fail" in why or "file write failed" in why:  # torch's zip writer: disk full or a size limit
        why = f"the write failed (disk full or a file size limit?): {why}"
    return CheckpointError(f"cannot write a checkpoint in {output_dir}: {why}. The previous checkpoint there is "
                           "intact; free space or fix permissions, then resume with resume=auto")


def save_checkpoint(state: dict, output_dir: str | os.PathLike, step: int, epoch_tag: int | None = None,
                    keep_last: int = 2) -> Path:
    """Write `state` (with its checksum) as step `step`, point checkpoint.pt at it, add the epoch copy
    if `epoch_tag` is given, and prune step checkpoints beyond the newest `keep_last`. Any write error
    becomes one CheckpointError naming the directory; what was there before is left intact."""
    out = Path(output_dir)
    state = dict(state)
    state.pop("checksum", None)
    state["checksum"] = content_digest(state)
    path = out / step_name(step)
    try:
        save_atomic(state, path)
        fault_point("checkpoint_link")
        _link_atomic(path, out / LATEST)
        if epoch_tag is not None:
            _link_atomic(path, out / epoch_name(epoch_tag))
    except (OSError, RuntimeError) as e:
        raise write_error(out, e) from None
    for old in step_files(out)[max(1, keep_last):]:
        old.unlink(missing_ok=True)
    return path


def remove_stale_temps(output_dir: str | os.PathLike) -> None:
    """Partial writes left by a killed run (the same directory is never written by two live runs)."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    stale = [p for p in out.iterdir() if TMP_RE.match(p.name)]
    if stale:
        size = sum(p.stat().st_size for p in stale)
        for p in stale:
            p.unlink(missing_ok=True)
        log.info(f"removed {len(stale)} partial checkpoint file(s) ({size / 2**20:.1f} MiB) left by an "
                 f"interrupted write in {out}")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def load(path: str | os.PathLike) -> dict:
    """Load and verify one checkpoint; CheckpointError says why a file is unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot load checkpoint {path}: the file is empty (0 bytes; a write that never "
                              "finished, or a full disk)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip whose directory is at the end
        raise CheckpointError(f"cannot load checkpoint {path}: not a complete checkpoint file (not a torch.save "
                              "archive, or one cut short)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message is a paragraph about weights_only
        raise CheckpointError(f"cannot load checkpoint {path}: it holds Python objects beyond tensors and plain "
                              "containers, so it was not written by sslight-dali") from None
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"cannot load checkpoint {path}: not a complete checkpoint file ({first_line(e)})") from None
    if isinstance(state, dict) and "checksum" in state:
        stored = state.pop("checksum")
        if content_digest(state) != stored:
            raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the checksum "
                                  "stored when it was written")
    return state


def step_files(output_dir: Path) -> list[Path]:
    """Step checkpoints, newest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def candidates(output_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint in a run directory, in the order resume=auto tries them (newest first)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    epochs = sorted(((int(m.group(1)), p) for p in out.iterdir() if (m := EPOCH_RE.match(p.name))), reverse=True)
    latest = [out / LATEST] if (out / LATEST).is_file() else []
    return latest + step_files(out) + [p for _, p in epochs]


def newest_valid(output_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint in output_dir that loads and verifies; each one skipped is
    logged with its reason. None if there is none (a warning if some existed but none was usable)."""
    found = candidates(output_dir)
    for i, path in enumerate(found):
        try:
            state = load(path)
        except CheckpointError as e:
            log.warning(f"resume=auto: skipping {path}: {e}")
            continue
        if i:
            log.warning(f"resume=auto: using {path}, the newest checkpoint that verifies")
        return path, state
    if found:
        log.warning(f"resume=auto: none of the {len(found)} checkpoint(s) in {output_dir} is usable: starting fresh")
    return None


def find_resume(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """'' -> None (fresh run); 'auto' -> the newest valid checkpoint in output_dir if any; else a path
    that must exist."""
    if not resume:
        return None
    if resume == "auto":
        found = newest_valid(output_dir)
        return found[0] if found else None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"train.resume: checkpoint not found: {p}")
    return p


def move_aside(output_dir: str | os.PathLike) -> Path:
    """Rename a previous run directory to `<dir>.old-<UTC time>` (never deletes it)."""
    out = Path(output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while dest.exists():
        dest = out.with_name(f"{out.name}.old-{stamp}-{n}")
        n += 1
    os.rename(out, dest)
    return dest


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
