"""What the evaluation commands share.

- `setup`: the checkpoint's backbone, the eval run's config (the pre-training run's, with the command's
  overrides), the output directory and the checks that must pass before anything is written.
- Feature extractors: pooled features for the CNNs; for ViT the CLS tokens of the last 4 blocks, each
  through the final LayerNorm, concatenated (DINO's linear-eval input, 4 x 192 = 768-d).
- `EpochLoop`: supervised training with the LR set once per epoch (the reference's classification
  scheduler indexes its per-iteration cosine at each epoch's first step, so the LR is a step-wise
  cosine), val top-1/top-5 after every epoch, atomic checkpoints and exact resume.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..backbones import backbone_entry
from ..config import Config, ConfigError, parse_overrides, to_dict
from ..files import atomic_write
from ..logger import RunLogger, StepTimer, setup_logging, timed_batches
from ..optim import cosine_schedule
from ..pretrained import Pretrained, load_pretrained
from ..run_config import config_from_dict, expand_key, validate
from ..run_policy import gather_per_rank, own_rank_entry, resolve_resume, stop_if_nonfinite
from ..runtime import (autocast_dtype, init_distributed, prepare_process, resolve_precision, shutdown_distributed,
                       uses_channels_last)

log = logging.getLogger("sslight")
MIN_LR = 1e-6  # the reference's SOLVER.MIN_LR for every classification protocol


# ------------------------------------------------------------------------------------------------
# Config, output directory, start-up checks
# ------------------------------------------------------------------------------------------------
def eval_config(pre: Pretrained, overrides: list[str], section: str | None) -> Config:
    """The pre-training run's config (data, crops, precision, backend) with the command's overrides.

    A bare key is looked up in eval.<section> first, so `epochs=10` is eval.linear.epochs for
    `eval linear`. The run mechanics are the train.* keys: resume, device, precision, seed,
    log_every, tensorboard, checkpoint_every, max_steps (the last three restart from 0 here, since
    the pre-training run's values count its own steps).
    """
    data = to_dict(pre.cfg)
    data["train"].update(resume="", max_steps=0, checkpoint_every=0)
    for key, value in parse_overrides(list(overrides)):
        if section and "." not in key:
            try:
                key = expand_key(f"eval.{section}.{key}")
            except ConfigError:
                pass
        node, parts = data, expand_key(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{pre.path}: {e}") from None
    validate(cfg)
    return cfg


def check_splits(cfg: Config, *splits: str) -> None:
    """Fail before anything is written when a split the command reads is missing."""
    from ..data import list_samples
    if not cfg.data.root:
        raise ConfigError("data.root is empty in the checkpoint's config (an imported checkpoint?): "
                          "pass data.root=DATASET_ROOT")
    for split in splits:
        list_samples(cfg.data.root, split, cfg.data.format, check=False)


@dataclass
class Run:
    pre: Pretrained
    cfg: Config
    out: Path
    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None      # autocast dtype (bf16 on GPU by default), None = fp32
    channels_last: bool
    resume_from: Path | None
    checked: object = None       # what the command's `check` returned


def setup(args, kind: str, section: str | None, splits, check=None) -> Run:
    """Everything that can reject the input runs before the output directory is created: the checkpoint,
    the config, the splits the command reads, and the command's own `check(pre, cfg)`."""
    pre = load_pretrained(args.checkpoint, args.weights)
    cfg = eval_config(pre, args.overrides, section)
    out = Path(args.out) if args.out else pre.path.parent / f"eval_{kind}"
    check_splits(cfg, *splits(cfg))
    checked = check(pre, cfg) if check is not None else None
    rank, world, device = init_distributed(cfg)
    resume_from = resolve_resume(cfg, out, rank, world)
    if resume_from is None and (out / ckpt.LATEST).exists():
        raise ckpt.CheckpointError(f"{out / ckpt.LATEST} exists: continue it with resume=auto, or choose another --out")
    setup_logging(out, rank, f"eval_{kind}.log")
    prepare_process(cfg.train.seed + rank, device)
    amp = autocast_dtype(resolve_precision(cfg, device))
    log.info(f"eval {kind}: {pre.path} ({pre.cfg.method} / {pre.cfg.model.backbone}, {pre.weights} weights, "
             f"epoch {pre.epoch}) on {world} x {device}; data {cfg.data.root} ({cfg.data.backend})")
    return Run(pre, cfg, out, rank, world, device, amp, uses_channels_last(cfg), resume_from, checked)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def finish(run: Run) -> None:
    shutdown_distributed()


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------
class LastBlocksCLS(nn.Module):
    """ViT linear-eval features: the CLS token after each of the last `n` blocks, each through the
    final norm, concatenated (n x embed_dim). No average of the patch tokens."""

    def __init__(self, vit: nn.Module, n: int = 4):
        super().__init__()
        self.vit, self.n = vit, n
        self.num_features = n * vit.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        cls = []
        for blk in v.blocks:
            x = blk(x)
            cls.append(x[:, 0])
        return torch.cat([v.norm(t) for t in cls[-self.n:]], dim=-1)


def feature_model(backbone: nn.Module, arch: str) -> nn.Module:
    n = backbone_entry(arch).eval_cls_blocks  # the backbone table says which feature the reference reads
    return LastBlocksCLS(backbone, n) if n else backbone


@torch.no_grad()
def accuracy(model: nn.Module, loader, device: torch.device, amp, world: int) -> dict:
    """Top-1/top-5 (%) over every sample of the (sharded, unpadded) loader, summed over ranks."""
    was_training = model.training
    model.eval()
    hits = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, count
    for images, labels, _ in loader:
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True))
        labels = labels.to(device)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        hits += torch.stack([top[:, :1].any(1).sum(), top.any(1).sum(), torch.tensor(labels.numel(), device=device)])
    model.train(was_training)
    if world > 1:
        dist.all_reduce(hits)
    n = max(hits[2].item(), 1.0)
    return {"top1": 100.0 * hits[0].item() / n, "top5": 100.0 * hits[1].item() / n, "n": int(hits[2].item())}


def epoch_lrs(peak: float, epochs: int) -> np.ndarray:
    """LR of each epoch: the reference's per-iteration cosine (peak -> MIN_LR, no warm-up) read at each
    epoch's first iteration, which is the same cosine with one value per epoch."""
    return cosine_schedule(peak, MIN_LR, epochs, 1)


# ------------------------------------------------------------------------------------------------
# Per-epoch training loop (linear reference protocol, semi-supervised fine-tuning)
# ------------------------------------------------------------------------------------------------
class EpochLoop:
    """`model` maps images to logits; `saved` is the part of it that a checkpoint holds (the frozen
    backbone of a linear probe is in the pre-training checkpoint already). `settings` identify the run:
    a resume with different settings is refused, naming the first that differs."""

    def __init__(self, run: Run, model: nn.Module, saved: nn.Module, optimizer: torch.optim.Optimizer,
                 lrs: np.ndarray, train_loader, val_loader, settings: dict):
        self.run, self.saved, self.optimizer, self.lrs = run, saved, optimizer, lrs
        self.train_loader, self.val_loader, self.settings = train_loader, val_loader, settings
        self.module = model
        self.model = model
        if run.world > 1:
            ids = [run.device.index] if run.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == torch.float16)
        self.step, self.epoch, self.history = 0, 0, []
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)
        self.logger = RunLogger(run.out, enabled=run.rank == 0, tensorboard=run.cfg.train.tensorboard)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"eval_settings": self.settings, "model": self.saved.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.epoch, "history": self.history,
                "rng": ckpt.rng_state(), "loader": self.train_loader.state_dict()}

    def check_finite(self) -> None:
        stop_if_nonfinite(self.nonfinite, self.run.world, f"non-finite loss at or before step {self.step}: stopping "
                          "without writing a checkpoint; lower the LR or use train.precision=fp32")

    def save(self) -> None:
        self.check_finite()
        state = gather_per_rank(self.state_dict(), ("loader", "rng"), self.run.world)
        if self.run.rank == 0:
            ckpt.save_atomic(state, self.run.out / ckpt.LATEST)

    def load(self, path: Path) -> None:
        state = ckpt.load(path)
        saved = state.get("eval_settings") if isinstance(state, dict) else None
        if saved is None:
            raise ckpt.CheckpointError(f"{path}: not a checkpoint of `sslight eval` (no 'eval_settings')")
        for key, value in self.settings.items():
            if saved.get(key) != value:
                raise ckpt.CheckpointError(f"{path}: {key} is {saved.get(key)!r} in the checkpoint but {value!r} now; "
                                           "resume with the same settings, or choose another --out")
        self.saved.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.history = int(state["step"]), int(state["epoch"]), list(state["history"])
        self.train_loader.load_state_dict(own_rank_entry(state["loader"], self.run.rank, self.run.world))
        ckpt.set_rng_state(own_rank_entry(state["rng"], self.run.rank, self.run.world))
        log.info(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    # -- the loop -------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(self.run.device, self.run.amp):
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.nonfinite |= ~torch.isfinite(loss.detach())
        self.step += 1
        return loss.detach()

    def fit(self) -> list[dict]:
        run, cfg, spe = self.run, self.run.cfg, self.train_loader.steps_per_epoch
        epochs = len(self.lrs)
        total = epochs * spe if not cfg.train.max_steps else min(epochs * spe, cfg.train.max_steps)
        timer, t0, start = StepTimer(), time.perf_counter(), self.step
        try:
            while self.step < total:
                for g in self.optimizer.param_groups:  # once per epoch: a step-wise cosine
                    g["lr"] = float(self.lrs[self.epoch])
                self.module.train()
                epoch_end = (self.epoch + 1) * spe
                for images, labels, _ in timed_batches(self.train_loader.epoch(self.epoch), timer, run.world):
                    loss = self.train_step(images.to(run.device, non_blocking=True), labels.to(run.device))
                    if self.step % cfg.train.log_every == 0 or self.step == total:
                        self._log(loss, timer, total, t0, start, spe)
                    every = cfg.train.checkpoint_every
                    if every and self.step % every == 0 and self.step < epoch_end:  # epoch ends save below
                        self.save()
                    if self.step >= total:
                        break
                if self.step < epoch_end:  # stopped by train.max_steps inside the epoch
                    self.save()
                    break
                self._validate()
                self.epoch += 1
                self.save()
                timer.reset()
        finally:
            self.logger.close()
        return self.history

    def _log(self, loss, timer: StepTimer, total: int, t0: float, start: int, spe: int) -> None:
        self.check_finite()
        _, wait, ips = timer.read()
        rec = {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": float(loss),
               "lr": self.optimizer.param_groups[0]["lr"], "images_per_sec": ips, "data_wait": wait,
               "time": time.time()}
        eta = (time.perf_counter() - t0) / max(self.step - start, 1) * (total - self.step)
        self.logger.write(rec, self.step)
        self.logger.progress(self.epoch, len(self.lrs), self.step - self.epoch * spe, spe, rec, eta)
        timer.reset()

    def _validate(self) -> None:
        res = accuracy(self.module, self.val_loader, self.run.device, self.run.amp, self.run.world)
        rec = {"epoch": self.epoch + 1, "top1": res["top1"], "top5": res["top5"], "val_images": res["n"],
               "lr": float(self.lrs[self.epoch])}
        self.history.append(rec)
        self.logger.write({"kind": "eval", "step": self.step, **rec}, self.step)
        best = max(self.history, key=lambda r: r["top1"])
        log.info(f"epoch {self.epoch + 1}/{len(self.lrs)}: val top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% "
                 f"on {res['n']} images (best top-1 {best['top1']:.2f}% at epoch {best['epoch']})")


def summarize(history: list[dict]) -> dict:
    """The paper reports the best val top-1 over epochs; the last epoch's is given beside it."""
    if not history:
        return {}
    best = max(history, key=lambda r: r["top1"])
    last = history[-1]
    return {"top1_best": best["top1"], "top5_at_best": best["top5"], "best_epoch": best["epoch"],
            "top5_best": max(r["top5"] for r in history), "top1_last": last["top1"], "top5_last": last["top5"],
            "epochs_done": last["epoch"], "history": history}
