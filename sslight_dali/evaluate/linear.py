"""`sslight eval linear CHECKPOINT`: a linear classifier on the frozen backbone.

protocol=reference (the paper's number):
- CNNs: `fc` N(0, 0.01), bias 0, on pooled features; the backbone stays in eval mode, so its BN
  statistics are frozen; LARS (momentum 0.9, eta 0.001; biases skip the trust ratio), peak LR 0.8 at
  global batch 4096 scaled by the actual one, cosine to 1e-6 set once per epoch, WD 0, 100 epochs.
- ViT: the same classifier on the CLS tokens of the last 4 blocks through the final norm (768-d);
  SGD momentum 0.9, WD 0, peak 0.04 at global batch 1024.
- Train views RandomResizedCrop(eval.crop, 0.08-1, bicubic) + flip; val resize eval.resize (bicubic) +
  centre crop eval.crop. Val top-1/top-5 after every epoch; the paper reports the best epoch's top-1.

protocol=fast (NOT the paper's; for comparing checkpoints quickly): centre-crop features of train and
val extracted once, standardised with the train statistics, and a linear layer trained on them with
AdamW (a cosine per step). Seconds to minutes instead of hours; its numbers differ from the protocol's.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import backbone_entry
from ..data import build_eval_loader
from ..knn import extract_features
from ..optim import LARS, cosine_schedule, param_groups
from .common import EpochLoop, epoch_lrs, feature_model, finish, setup, summarize, write_json

log = logging.getLogger("sslight")

# (optimizer, peak LR, at global batch, per-GPU batch) of the reference's linear protocols.
REFERENCE = {"cnn": ("lars", 0.8, 4096, 512), "vit": ("sgd", 0.04, 1024, 128)}
FAST = {"lr": 1e-3, "batch_size": 256}
FAST_NOTE = ("protocol=fast: a linear layer on cached centre-crop features (no augmentation, AdamW). "
             "NOT the paper's linear protocol; use it to compare checkpoints, not to quote beside the paper.")


def new_fc(dim: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(dim, num_classes)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


class FrozenLinear(nn.Module):
    """`fc` on the features of a frozen backbone that stays in eval mode whatever mode this module is in."""

    def __init__(self, features: nn.Module, fc: nn.Linear):
        super().__init__()
        self.features, self.fc = features.requires_grad_(False), fc

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # BN running statistics stay those of pre-training
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.features(x)  # under the caller's autocast (bf16 on GPU by default)
        with torch.autocast(x.device.type, enabled=False):  # the classifier in fp32
            return self.fc(f.float())


# ------------------------------------------------------------------------------------------------
# fast protocol
# ------------------------------------------------------------------------------------------------
def train_on_features(tf, tl, vf, vl, num_classes: int, epochs: int, lr: float, batch_size: int,
                      seed: int = 0) -> list[dict]:
    """A linear layer on cached features (standardised with the train mean/std); val top-1/top-5 per epoch."""
    mean, std = tf.mean(0), tf.std(0).clamp_min(1e-6)
    tf, vf = (tf - mean) / std, (vf - mean) / std
    g = torch.Generator().manual_seed(seed)
    fc = new_fc(tf.shape[1], num_classes).to(tf.device)
    opt = torch.optim.AdamW(fc.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = -(-tf.shape[0] // batch_size)
    lrs = cosine_schedule(lr, 0.0, epochs, steps_per_epoch)
    history, step = [], 0
    for epoch in range(epochs):
        order = torch.randperm(tf.shape[0], generator=g).to(tf.device)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            opt.param_groups[0]["lr"] = float(lrs[step])
            loss = F.cross_entropy(fc(tf[idx]), tl[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            top = fc(vf).topk(min(5, num_classes), dim=1).indices == vl[:, None]
        history.append({"epoch": epoch + 1, "top1": 100.0 * top[:, 0].float().mean().item(),
                        "top5": 100.0 * top.any(1).float().mean().item()})
    return history


def fast_probe(cfg, backbone: nn.Module, device: torch.device, amp=None, rank: int = 0, world: int = 1,
               channels_last: bool = False) -> dict:
    """protocol=fast for `backbone` (also the demo's probe): features on every rank, then the layer."""
    linear_cfg = cfg.eval.linear
    model = feature_model(backbone, cfg.model.backbone).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bs = linear_cfg.batch_size or FAST["batch_size"]

    def features(split):
        loader = build_eval_loader(cfg, split, rank, world, channels_last)
        return extract_features(model, loader, device, amp), loader.num_classes

    (tf, tl), num_classes = features("train")
    (vf, vl), _ = features("val")
    history = train_on_features(tf, tl, vf, vl, num_classes, linear_cfg.epochs, linear_cfg.lr or FAST["lr"], bs,
                                cfg.train.seed)
    return {"protocol": "fast", "note": FAST_NOTE, "feature_dim": int(tf.shape[1]), "train_images": int(tf.shape[0]),
            "val_images": int(vf.shape[0]), "optimizer": "adamw", "lr": linear_cfg.lr or FAST["lr"], "batch_size": bs,
            "epochs": linear_cfg.epochs, **summarize(history)}


# ------------------------------------------------------------------------------------------------
# reference protocol
# ------------------------------------------------------------------------------------------------
def reference_linear(run) -> dict:
    cfg, linear_cfg = run.cfg, run.cfg.eval.linear
    kind = backbone_entry(cfg.model.backbone).family
    opt_name, ref_lr, ref_batch, ref_per_gpu = REFERENCE[kind]
    bs = linear_cfg.batch_size or ref_per_gpu
    common = dict(rank=run.rank, world_size=run.world, channels_last=run.channels_last, batch_size=bs)
    # Several processes drop the last partial batch so that every rank runs the same number of steps.
    train_loader = build_eval_loader(cfg, "train", train_augment=True, drop_last=run.world > 1, **common)
    val_loader = build_eval_loader(cfg, "val", **common)
    features = feature_model(run.pre.backbone, cfg.model.backbone)
    fc = new_fc(features.num_features, train_loader.num_classes)
    model = FrozenLinear(features, fc).to(run.device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = bs * run.world
    peak = (linear_cfg.lr or ref_lr) * global_batch / ref_batch
    if opt_name == "lars":  # fc.weight gets the trust ratio, the bias not (the reference's 1-D exclusion)
        optimizer = LARS([{**g, "weight_decay": 0.0} for g in param_groups(fc)], lr=peak, momentum=0.9, eta=0.001)
    else:
        optimizer = torch.optim.SGD(fc.parameters(), lr=peak, momentum=0.9, weight_decay=0.0)
    settings = {"checkpoint": str(run.pre.path.resolve()), "weights": run.pre.weights, "protocol": "reference",
                "epochs": linear_cfg.epochs, "peak_lr": peak, "global_batch": global_batch, "optimizer": opt_name,
                "train_images": train_loader.num_samples, "val_images": val_loader.num_samples,
                "crop": cfg.eval.crop, "resize": cfg.eval.resize, "backend": cfg.data.backend}
    loop = EpochLoop(run, model, fc, optimizer, epoch_lrs(peak, linear_cfg.epochs), train_loader, val_loader, settings)
    if run.resume_from is not None:
        loop.load(run.resume_from)
    log.info(f"linear (reference protocol): {opt_name}, peak LR {peak:.4g} at global batch {global_batch}, "
             f"{linear_cfg.epochs} epochs of {train_loader.steps_per_epoch} steps, {features.num_features}-d features, "
             f"{train_loader.num_samples} train / {val_loader.num_samples} val images")
    history = loop.fit()
    return {**settings, "feature_dim": features.num_features, "steps": loop.step,
            "note": "the reference's linear protocol; the paper reports top1_best", **summarize(history)}


def main(args) -> int:
    run = setup(args, "linear", "linear", lambda cfg: (cfg.data.train_split, cfg.data.val_split))
    try:
        if run.cfg.eval.linear.protocol == "fast":
            log.warning(FAST_NOTE)
            result = fast_probe(run.cfg, run.pre.backbone, run.device, run.amp, run.rank, run.world, run.channels_last)
            result.update(checkpoint=str(run.pre.path), weights=run.pre.weights)
        else:
            result = reference_linear(run)
    finally:
        finish(run)
    if not result.get("history"):
        if run.rank == 0:
            log.info("stopped before the first epoch ended (train.max_steps); continue with resume=auto")
        return 0
    result = {"backbone": run.pre.cfg.model.backbone, "method": run.pre.cfg.method, "pretrain_epoch": run.pre.epoch,
              "checkpoint": str(run.pre.path.resolve()), "weights": run.pre.weights,
              "complete": result["epochs_done"] == result["epochs"], **result}
    if run.rank == 0:
        write_json(run.out / "eval_linear.json", result)
        log.info(f"linear ({result['protocol']}): best val top-1 {result['top1_best']:.2f}% (epoch "
                 f"{result['best_epoch']}), last {result['top1_last']:.2f}%, top-5 {result['top5_last']:.2f}%; "
                 f"written to {run.out / 'eval_linear.json'}")
    return 0
