"""What every loader backend shares: the verified samples of a split, the device and dtype, seeding
and the epoch/step position. Backend-neutral: nothing here (or in sources.py, torch_views.py,
build.py) imports DALI, so the torchvision backend works where DALI is not installed."""
from __future__ import annotations

import os

import torch

from ..runtime import on_rank0, world_size
from .sources import DataError, Samples, drop_bad_samples, find_bad_samples_cached, list_samples, set_pixel_limit


def resolve_device(device: str) -> str:
    """data.device -> 'gpu' | 'cpu': 'auto' is the GPU when CUDA is available; 'cuda' means 'gpu'."""
    if device == "cuda":
        device = "gpu"
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("data.device=gpu but CUDA is not available; use data.device=cpu or auto")
    return device


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without waiting for the GPU. A copy from pageable memory first waits
    for all the work queued on the GPU (the training step just launched), so every step would stall
    the host; from pinned memory the copy is queued like a kernel."""
    if device.type != "cuda":
        return t
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def verify_cache_dir(cfg) -> str:
    """data.verify_cache resolved: auto = $XDG_CACHE_HOME/sslight-dali/verified (~/.cache/...)."""
    if cfg.data.verify_cache != "auto":
        return cfg.data.verify_cache
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sslight-dali", "verified")


def load_split(cfg, split: str) -> Samples:
    """The verified samples of a split. Under torch.distributed only rank 0 reads every file to check
    it (a full pass over ImageNet is minutes); the others receive its verdict, so all ranks agree.
    The verdict is cached (data.verify_cache) by the files' paths, sizes and mtimes, so a restart on
    unchanged data only stats the files."""
    if not cfg.data.root:
        raise DataError("data.root is empty: set it to a dataset root (e.g. made by `sslight data synth`)")
    set_pixel_limit(cfg.data.max_image_pixels)
    samples = list_samples(cfg.data.root, split, cfg.data.format, check=False)
    check = lambda: find_bad_samples_cached(samples, cfg.data.num_threads, verify_cache_dir(cfg))  # noqa: E731
    if world_size() > 1:
        # A first check of a large data set on a slow file system can outlast train.dist_timeout_s;
        # the others wait for it however long it takes.
        bad = on_rank0(check, poll_s=min(30.0, cfg.train.dist_timeout_s / 3))
    else:
        bad = check()
    return drop_bad_samples(samples, bad, cfg.data.skip_bad_files)


def mix_seed(seed: int, rank: int) -> int:
    """Per-rank augmentation seed: different views on every rank, reproducible for a given seed."""
    return (seed * 1_000_003 + rank * 7919 + 1) % (2 ** 31 - 1)


def too_few_samples(n: int, world_size: int, batch_size: int, root: str) -> str:
    """The one-line error for a split smaller than one batch per process."""
    per_rank = -(-n // world_size)
    return (f"{n} usable images under {root} over {world_size} process(es) give {per_rank} per process, fewer than "
            f"one batch (train.batch_size={batch_size}): lower train.batch_size or add images")


class LoaderPosition:
    """Epoch/step bookkeeping and its state. Subclasses set steps_per_epoch, num_samples, rank,
    world_size and define epoch(e)."""
    _next_epoch = 0
    _step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        return self.epoch(self._next_epoch)

    def _position(self) -> dict:
        return {"epoch": self._next_epoch, "step": self._step, "num_samples": self.num_samples,
                "world_size": self.world_size, "rank": self.rank}

    def _restore_position(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise DataError(f"the checkpoint was written on {state['num_samples']} images and the data now has "
                            f"{self.num_samples}: the data set changed since. Resume needs the "
                            "same images; to train on the new set, start a new train.output_dir")
        for key in ("world_size", "rank"):
            if state[key] != getattr(self, key):
                raise DataError(f"the loader state was saved with {key}={state[key]} and this process has "
                                f"{getattr(self, key)}: resume with the same number of processes")
        self._next_epoch, self._step = state["epoch"], state["step"]
