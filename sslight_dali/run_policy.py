"""Run policy: what `sslight train` and the eval commands decide around the loop, apart from it.

- The run directory: a fresh run never overwrites an earlier one (`claim_output_dir`).
- Resume: which checkpoint every rank continues from (`resume_point`), and whether it fits the
  config (`check_resumable`, `RESUME_KEYS`).
- Per-rank checkpoint entries: the loader, RNG and per-rank buffers (`gather_per_rank`, `own_rank_entry`).
- The data: an empty data.root means the embedded synthetic set (`prepare_data_root`); kNN monitoring
  needs a labelled split (`check_eval_split`).
- A non-finite loss stops the run without writing a checkpoint (`stop_if_nonfinite`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, to_dict
from .data import DataError, list_samples
from .methods import method_class
from .runtime import is_distributed
from .synth import synth_dataset

log = logging.getLogger("sslight")


class NonFiniteLossError(RuntimeError):
    pass


def stop_if_nonfinite(nonfinite: torch.Tensor, world: int, message: str) -> None:
    """Raise NonFiniteLossError(message) when any rank saw a non-finite loss. A host sync (and with
    several processes a collective every rank must call): on log steps and before checkpoints only."""
    flag = nonfinite.to(torch.int32)
    if world > 1:  # every rank must stop together, or the others hang in the next collective
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if bool(flag):
        raise NonFiniteLossError(message)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def prepare_data_root(cfg: Config, rank: int) -> None:
    """An empty data.root means the embedded synthetic dataset (made once, under data/synth)."""
    if cfg.data.root:
        return
    root = Path("data/synth")
    if rank == 0 and not (root / "synth.json").is_file():
        log.info(f"data.root is empty: writing the embedded synthetic dataset to {root}")
        synth_dataset(root)
    if is_distributed():
        dist.barrier()
    cfg.data.root = str(root)


def check_eval_split(cfg: Config) -> None:
    """Fail at start, not after the first epoch, when kNN is on and the val split is missing. kNN
    needs labels: without a labelled val split it is turned off with a note when the train split
    has none either (unlabeled data, nothing to monitor against), and is an error otherwise."""
    if not cfg.train.knn_every:
        return
    try:
        val = list_samples(cfg.data.root, cfg.data.val_split, cfg.data.format, check=False)
    except DataError as e:
        train_split = list_samples(cfg.data.root, cfg.data.train_split, cfg.data.format, check=False)
        if train_split.classes:
            raise DataError(f"{e}; kNN monitoring (train.knn_every={cfg.train.knn_every}) needs a labelled val split: "
                            "set train.knn_every=0 to train without one") from None
        val = train_split
    if not val.classes:
        log.info(f"no labelled val split ('{cfg.data.val_split}' under {cfg.data.root}): kNN monitoring is off")
        cfg.train.knn_every = 0


# ------------------------------------------------------------------------------------------------
# The run directory and resume
# ------------------------------------------------------------------------------------------------
def claim_output_dir(cfg: Config, output_dir: Path, rank: int, world: int) -> Path | None:
    """Make sure the run directory can be written and that a fresh run never overwrites an earlier
    one: refuse, or with train.overwrite=true move the old run aside (returns where to). Rank 0
    decides and every rank raises the same error, so none is left waiting."""
    error, moved = None, None
    if rank == 0:
        try:
            if output_dir.exists() and not output_dir.is_dir():
                raise NotADirectoryError(f"{output_dir} exists and is not a directory")
            if not cfg.train.resume and ckpt.candidates(output_dir):
                if not cfg.train.overwrite:
                    raise ckpt.CheckpointError(
                        f"train.output_dir {output_dir} already holds a run's checkpoints; continue it with "
                        "resume=auto, choose a new train.output_dir, or set train.overwrite=true to move the "
                        "old run aside")
                moved = ckpt.move_aside(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except ckpt.CheckpointError as e:
            error = str(e)
        except OSError as e:
            error = f"train.output_dir {output_dir} cannot be used: {e.strerror or e}" + (
                f" ({e.filename})" if getattr(e, "filename", None) else "")
    if world > 1:
        box = [error, moved]
        dist.broadcast_object_list(box, src=0)
        error, moved = box
    if error:
        raise ckpt.CheckpointError(error)
    return moved


def resolve_resume(cfg: Config, output_dir: Path, rank: int, world: int) -> Path | None:
    """The checkpoint every rank resumes from, or None (see resume_point)."""
    return resume_point(cfg, output_dir, rank, world)[0]


def resume_point(cfg: Config, output_dir: Path, rank: int, world: int) -> tuple[Path | None, dict | None]:
    """Rank 0 decides which checkpoint (if any) every rank resumes from, so ranks never disagree.
    resume=auto takes the newest one that loads and verifies. Returns (path, state)."""
    state, choice = None, [None]
    if rank == 0:
        ckpt.remove_stale_temps(output_dir)
        if cfg.train.resume == "auto":
            found = ckpt.newest_valid(output_dir)
            if found is None:
                log.info(f"resume=auto: no checkpoint in {output_dir}: starting a fresh run")
            else:
                choice[0], state = str(found[0]), found[1]
        else:
            p = ckpt.find_resume(output_dir, cfg.train.resume)
            choice[0] = str(p) if p else None
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    path = Path(choice[0]) if choice[0] else None
    if path is not None and state is None:
        state = ckpt.load(path)
    return path, state


# Keys that shape the model, optimizer, schedules or data state: a checkpoint resumes only with the same.
# Each method adds the keys of its own section (SSLMethod.resume_keys: head sizes, queue length).
RESUME_KEYS = ("method", "model.backbone", "optim.name", "train.batch_size", "train.epochs",
               "recipe.global.count", "recipe.global.size", "recipe.local.count", "recipe.local.size")


def check_resumable(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint whose RESUME_KEYS differ from cfg's. data.pipelines=auto takes the
    checkpoint's count (the data order depends on it); an explicit other count is refused by the loader."""
    if cfg.data.pipelines == "auto":
        kept = (saved.get("data") or {}).get("pipelines", 1)  # 1: written before data.pipelines existed
        cfg.data.pipelines = kept if isinstance(kept, int) else "auto"
    now = to_dict(cfg)
    keys = RESUME_KEYS + tuple(f"{cfg.method}.{k}" for k in method_class(cfg.method).resume_keys)
    for key in keys:
        a, b = saved, now
        for part in key.split("."):
            a, b = (a or {}).get(part), b.get(part)
        if a != b:
            raise ckpt.CheckpointError(f"{path}: {key} is {a!r} in the checkpoint but {b!r} now; resume with the "
                                       f"checkpoint's value, or start a new train.output_dir")


# ------------------------------------------------------------------------------------------------
# Per-rank checkpoint entries
# ------------------------------------------------------------------------------------------------
def gather_per_rank(state: dict, keys: tuple[str, ...], world: int) -> dict:
    """Replace state[key] by {"per_rank": [every rank's value]} (the loader and RNG states are per rank).
    A collective: every rank must call it."""
    if world > 1:
        for key in keys:
            gathered = [None] * world
            dist.all_gather_object(gathered, state[key])
            state[key] = {"per_rank": gathered}
    return state


def own_rank_entry(entry: dict, rank: int, world: int) -> dict:
    """This rank's part of a per-rank checkpoint entry."""
    if "per_rank" not in entry:
        return entry
    if len(entry["per_rank"]) != world:
        raise ckpt.CheckpointError(
            f"the checkpoint was written by {len(entry['per_rank'])} processes and this run has {world}: "
            "the data order and queues are per process, so resume with the same number of processes")
    return entry["per_rank"][rank]
