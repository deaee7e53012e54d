"""What the evaluation commands share.

- `setup`: the checkpoint's backbone, the eval run's config (the pre-training run's, with the command's
  overrides), the output directory and the checks that must pass before anything is written.
- Feature extractors: pooled features for the CNNs; for ViT the CLS tokens of the last 4 blocks, each
  through the final LayerNorm, concatenated (DINO's linear-eval input, 4 x 192 = 768-d).
- `EpochLoop`: supervised training with the LR set once per epoch (the reference's classification
  scheduler indexes its per-iteration cosine at each epoch's first step, so the LR is a step-wise
  cosine), val top-1/top-5 after every epoch, atomic checkpoints and exact resume, on the run loop
  pre-training uses (loop.py: stop signals, checkpoints, max_steps, the non-finite stop, logging).
"""
from __future__ import annotations

import json
import logging
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
from ..data import list_samples
from ..files import atomic_write
from ..logger import setup_logging
from ..loop import RunLoop
from ..optim import cosine_schedule
from ..pretrained import Pretrained, load_pretrained
from ..run_config import config_from_dict, expand_key, validate
from ..run_policy import own_rank_entry, resolve_resume
from ..runtime import (autocast, autocast_dtype, init_distributed, prepare_process, resolve_precision,
                       shutdown_distributed, uses_channels_last)

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
class EpochLoop(RunLoop):
    """`model` maps images to logits; `saved` is the part of it that a checkpoint holds (the frozen
    backbone of a linear probe is in the pre-training checkpoint already). `settings` identify the run:
    a resume with different settings is refused, naming the first that differs. The loop around the
    steps (stop signals, checkpoints, max_steps, the non-finite stop, logging) is loop.RunLoop's."""
    NONFINITE = ("non-finite loss at or before step {step}: stopping without writing a checkpoint; "
                 "lower the LR or use train.precision=fp32")

    def __init__(self, run: Run, model: nn.Module, saved: nn.Module, optimizer: torch.optim.Optimizer,
                 lrs: np.ndarray, train_loader, val_loader, settings: dict):
        self.run, self.saved, self.optimizer, self.lrs = run, saved, optimizer, lrs
        self.loader, self.val_loader, self.settings = train_loader, val_loader, settings
        self.cfg, self.rank, self.world, self.device, self.output_dir = run.cfg, run.rank, run.world, run.device, run.out
        self.module = model
        self.model = model
        if run.world > 1:
            ids = [run.device.index] if run.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == torch.float16)
        self.epochs = len(lrs)
        self.step, self.epoch, self.history = 0, 0, []
        self.init_loop()

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"eval_settings": self.settings, "model": self.saved.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.epoch, "history": self.history,
                "rng": ckpt.rng_state(), "loader": self.loader.state_dict()}

    def write_checkpoint(self, state: dict, tag_epoch: bool) -> None:
        try:
            ckpt.save_atomic(state, self.output_dir / ckpt.LATEST)
        except (OSError, RuntimeError) as e:
            raise ckpt.write_error(self.output_dir, e) from None

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
        self.loader.load_state_dict(own_rank_entry(state["loader"], self.run.rank, self.run.world))
        ckpt.set_rng_state(own_rank_entry(state["rng"], self.run.rank, self.run.world))
        log.info(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    # -- the run loop's hooks (loop.RunLoop) ----------------------------------------------------
    def start_epoch(self) -> None:
        for g in self.optimizer.param_groups:  # once per epoch: a step-wise cosine
            g["lr"] = float(self.lrs[self.epoch])
        self.module.train()

    def run_step(self, batch) -> tuple[torch.Tensor, dict]:
        images, labels, _ = batch
        return self.train_step(images.to(self.device, non_blocking=True), labels.to(self.device)), {}

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

    def record(self, metrics: dict) -> dict:
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def fit(self) -> list[dict]:
        super().fit()
        return self.history

    def end_epoch(self) -> None:
        """Val top-1/top-5 of the epoch that just ended, before its checkpoint."""
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
