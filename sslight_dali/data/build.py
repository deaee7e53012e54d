"""Loader factories: pick the backend (DALI or torchvision) and device from the config.

The DALI loaders are imported only when a DALI loader is built: the torchvision backend needs no DALI."""
from __future__ import annotations

import copy

import torch

from ..augment import OPS
from ..config import Config, ConfigError, GlobalViews, LocalViews, Recipe
from ..runtime import torch_dtype
from .base import load_split, resolve_device
from .sources import Samples
from .torch_views import EvalDataset, MultiViewDataset, TorchLoader


def _dali_loaders():
    """The DALI loader module, imported on first use; a clear error where DALI is not installed."""
    try:
        from . import loader  # optional: DALI
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("nvidia"):
            raise
        raise ConfigError("data.backend=dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); "
                          "install it or use data.backend=torchvision") from None
    return loader


def resolve_pipelines(setting: int | str, device: str, num_threads: int, per_process: int | None = None,
                      batch_size: int = 1) -> int:
    """data.pipelines as a count for a DALI training loader on `device` ("gpu" or "cpu"): an integer as
    given; auto = 1 on the GPU (its operators are GPU kernels: no CPU cores wait on one another), and
    on the CPU 2 when there are at least 2 threads (DALI runs one CPU operator at a time, so one
    pipeline leaves cores idle; 2 is what `sslight bench tune` found best on a 2-core node) and each
    pipeline gets a full batch of this process's `per_process` samples, else 1."""
    if setting != "auto":
        return int(setting)
    fits = per_process is None or per_process // 2 >= batch_size
    return 2 if device == "cpu" and num_threads >= 2 and fits else 1


def linear_probe_recipe(recipe: Recipe, crop: int) -> Recipe:
    """Supervised linear-probe training views: RandomResizedCrop(crop, 0.08-1, bicubic) + flip only."""
    probe = copy.deepcopy(recipe)
    probe.name = "linear_probe"
    probe.global_ = GlobalViews(count=1, size=crop, scale=[0.08, 1.0])
    probe.local = LocalViews(count=0, size=crop, scale=[0.08, 1.0])
    for op in OPS:  # crop and flip only: the other ops' defaults (blur, jitter, ...) go
        if op.name != "flip":
            op.disable(probe)
    return probe


def _common(cfg: Config, rank: int, world_size: int, channels_last: bool, dtype) -> dict:
    return dict(rank=rank, world_size=world_size, channels_last=channels_last,
                dtype=torch_dtype(dtype if dtype is not None else cfg.data.dtype))


def build_train_loader(cfg: Config, rank: int = 0, world_size: int = 1, channels_last: bool = True,
                       dtype: torch.dtype | str | None = None, debug: bool = False, recipe: Recipe | None = None,
                       batch_size: int | None = None, drop_last: bool = True, samples: Samples | None = None):
    """Multi-view pre-training loader for cfg.data.train_split; `for views, labels, indices in loader.epoch(e)`.

    dtype None = cfg.data.dtype. debug=True (DALI only) also yields per-view op records.
    `samples`: read these (e.g. a labelled subset) instead of cfg.data.train_split.
    """
    recipe = recipe or cfg.recipe
    batch_size = batch_size or cfg.train.batch_size
    samples = samples if samples is not None else load_split(cfg, cfg.data.train_split)
    device = resolve_device(cfg.data.device)
    common = _common(cfg, rank, world_size, channels_last, dtype)
    if cfg.data.backend == "torchvision":
        return TorchLoader(MultiViewDataset(samples, recipe, cfg.data.skip_bad_files), batch_size, num_workers=cfg.data.num_threads,
                           seed=cfg.train.seed, device=device, shuffle=True, drop_last=drop_last,
                           classes=samples.classes, **common)
    # Several pipelines drop up to a batch per pipeline per epoch: only with drop_last (pre-training).
    pipelines = resolve_pipelines(cfg.data.pipelines, device, cfg.data.num_threads, len(samples) // world_size,
                                  batch_size) if drop_last else 1
    loader = _dali_loaders().DaliTrainLoader(samples, recipe, debug=debug, hw_decoder_load=cfg.data.hw_decoder_load, drop_last=drop_last,
                           batch_size=batch_size, device=device, num_threads=cfg.data.num_threads,
                           prefetch=cfg.data.prefetch, seed=cfg.train.seed, pipelines=pipelines, **common)
    if drop_last:
        # The count auto chose, in the config the run saves (config.yaml, checkpoints: a resumed run
        # keeps it, run_policy.check_resumable) and in bench records
        cfg.data.pipelines = pipelines
    return loader


class _FirstView:
    """Adapts a one-view training loader to the eval interface: yields (images, labels, indices)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int):
        for views, labels, index in self.loader.epoch(epoch):
            yield views[0], labels, index

    def __iter__(self):
        return self.epoch(self.loader._next_epoch)

    def __len__(self):
        return len(self.loader)


def build_eval_loader(cfg: Config, split: str = "val", rank: int = 0, world_size: int = 1,
                      channels_last: bool = True, train_augment: bool = False, batch_size: int | None = None,
                      dtype: torch.dtype | str | None = None, samples: Samples | None = None, drop_last: bool = False):
    """Evaluation loader over `split` ('val' = cfg.data.val_split, 'train' = cfg.data.train_split, or a name).

    Default: resize the shorter side to cfg.eval.resize (bicubic), centre crop cfg.eval.crop, normalize;
    no shuffle, no drop-last: every sample of this rank's shard exactly once. With world_size > 1 the
    shards are disjoint and cover the split; their lengths differ by at most one and nothing is padded,
    so gather per-rank results with their `indices` (sizes may differ by one).
    train_augment=True: linear-probe training views (RRC 0.08-1 + flip, reshuffled every epoch; drop_last
    as asked: several processes need it, so that every rank runs the same number of steps).
    `samples`: read these (e.g. a labelled subset) instead of the split's files.
    """
    split_name = {"val": cfg.data.val_split, "train": cfg.data.train_split}.get(split, split)
    batch_size = batch_size or cfg.eval.batch_size
    if train_augment:
        probe_cfg = copy.deepcopy(cfg)
        probe_cfg.data.train_split = split_name
        # data.pipelines is for pre-training: several pipelines drop up to a batch per pipeline per
        # epoch, which a labelled subset cannot spare
        probe_cfg.data.pipelines = 1
        return _FirstView(build_train_loader(probe_cfg, rank, world_size, channels_last, dtype,
                                             recipe=linear_probe_recipe(cfg.recipe, cfg.eval.crop),
                                             batch_size=batch_size, drop_last=drop_last, samples=samples))
    samples = samples if samples is not None else load_split(cfg, split_name)
    device = resolve_device(cfg.data.device)
    aug, common = cfg.recipe.augment, _common(cfg, rank, world_size, channels_last, dtype)
    if cfg.data.backend == "torchvision":
        return TorchLoader(EvalDataset(samples, cfg.eval.resize, cfg.eval.crop, aug.mean, aug.std,
                                       cfg.data.skip_bad_files), batch_size,
                           num_workers=cfg.data.num_threads, seed=cfg.train.seed, device=device, shuffle=False,
                           drop_last=False, classes=samples.classes, **common)
    return _dali_loaders().DaliEvalLoader(samples, cfg.eval.resize, cfg.eval.crop, aug.mean, aug.std,
                          hw_decoder_load=cfg.data.hw_decoder_load, batch_size=batch_size, device=device,
                          num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch, seed=cfg.train.seed, **common)
