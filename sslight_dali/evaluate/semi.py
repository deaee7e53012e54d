"""`sslight eval semi CHECKPOINT --subset 1|10|FILE`: semi-supervised fine-tuning, the reference's protocol.

The whole network is trained (train mode; SyncBN across GPUs on CUDA) on a labelled subset of the
train split: SGD Nesterov momentum 0.9, WD 0, peak LR 0.12 at global batch 1024 scaled by the actual
one, cosine to 1e-6 set once per epoch, 60 epochs for 1 %, 30 for 10 %. Views as the linear protocol
(RandomResizedCrop 0.08-1 + flip; val resize + centre crop). The classifier is a 3-layer MLP
fc1/bn1/act1/fc2/bn2/act2/fc3; with eval.semi.use_head its first two Linear+BN layers start from the
DINO projection head's (`head.mlp.0/.1/.3/.4`), only fc3 is new.

Subset files: one line per image, `dataset_index,label,wnid,filename`, the index into the split in
ImageFolder order (classes sorted, files sorted within a class). Without a file, `--subset 1|10` draws
that percentage of every class (at least one image) with eval.semi.seed and writes it next to the
results in the same format, so the run can be repeated or compared on the same images.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from ..config import ConfigError
from ..data import DataError, build_eval_loader, list_samples
from ..data.base import verify_cache_dir
from ..data.sources import Samples, drop_bad_samples, find_bad_samples_cached
from ..methods.common import trunc_normal_init_
from ..models import sync_batchnorm
from .common import EpochLoop, epoch_lrs, finish, setup, summarize, write_json

log = logging.getLogger("sslight")
REF_LR_BATCH = 1024
EPOCHS = {1: 60, 10: 30}  # the reference's schedule per subset size (percent)
HIDDEN = 2048


# ------------------------------------------------------------------------------------------------
# Subsets
# ------------------------------------------------------------------------------------------------
def draw_subset(labels: list[int], percent: float, seed: int) -> list[int]:
    """`percent` % of every class (rounded, at least 1), seeded; dataset indices in ascending order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(len(idx) * percent / 100)))
        picked.extend(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
    return sorted(picked)


def write_subset(path: Path, samples, indices: list[int]) -> None:
    lines = [f"{i},{samples.labels[i]},{samples.classes[samples.labels[i]]},{Path(samples.files[i]).name}"
             for i in indices]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def read_subset(path: Path, samples) -> list[int]:
    """Indices named by a subset file; every line must name an image of `samples` exactly."""
    if not path.is_file():
        raise DataError(f"subset file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: expected 'dataset_index,label,wnid,filename', got {line!r}")
        i, label, wnid, name = int(parts[0]), int(parts[1]), parts[2], parts[3]
        if i >= len(samples):
            raise DataError(f"{path}:{n}: index {i} is past the end of the split ({len(samples)} images under "
                            f"{samples.root})")
        have = (samples.labels[i], samples.classes[samples.labels[i]], Path(samples.files[i]).name)
        if have != (label, wnid, name):
            raise DataError(f"{path}:{n}: names {label},{wnid},{name} but image {i} of {samples.root} is "
                            f"{have[0]},{have[1]},{have[2]} (indices follow ImageFolder order)")
        out.append(i)
    if not out:
        raise DataError(f"{path}: no images listed")
    if len(set(out)) != len(out):
        raise DataError(f"{path}: lists an image more than once")
    return out


def subset_samples(cfg, indices: list[int], full):
    """The subset as Samples, checked like a split (bad files fail or are skipped, data.skip_bad_files)."""
    sub = Samples([full.files[i] for i in indices], [full.labels[i] for i in indices], full.classes, full.root,
                  [full.members[i] for i in indices] if full.members is not None else None)
    bad = find_bad_samples_cached(sub, cfg.data.num_threads, verify_cache_dir(cfg))
    return drop_bad_samples(sub, bad, cfg.data.skip_bad_files)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
class SemiModel(nn.Module):
    """Backbone -> fc1/bn1/GELU -> fc2/bn2/GELU -> fc3 (the reference's semi-supervised classifier)."""

    def __init__(self, backbone: nn.Module, hidden: int, num_classes: int):
        super().__init__()
        d = backbone.num_features
        self.backbone = backbone
        self.head = nn.Sequential(OrderedDict(
            fc1=nn.Linear(d, hidden), bn1=nn.BatchNorm1d(hidden), act1=nn.GELU(),
            fc2=nn.Linear(hidden, hidden), bn2=nn.BatchNorm1d(hidden), act2=nn.GELU(),
            fc3=nn.Linear(hidden, num_classes)))
        trunc_normal_init_(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# DINO head layer -> semi head layer (build_mlp's indices: Linear, BN, GELU, Linear, BN, ...).
HEAD_MAP = {"mlp.0.": "fc1.", "mlp.1.": "bn1.", "mlp.3.": "fc2.", "mlp.4.": "bn2."}


def dino_head_state(path: Path, weights: str) -> dict:
    """fc1/bn1/fc2/bn2 of the semi head from the checkpoint's DINO projection head."""
    state = ckpt.load(path)["model"]
    prefix = f"{weights}.head."
    out = {}
    for key, value in state.items():
        for src, dst in HEAD_MAP.items():
            if key.startswith(prefix + src):
                out[dst + key[len(prefix + src):]] = value
    return out


def check_head(pre, use_head: bool) -> dict:
    """The DINO head's fc1/bn1/fc2/bn2 state, or {} without use_head; ConfigError when it cannot be used."""
    cfg = pre.cfg
    if not use_head:
        return {}
    if cfg.method != "dino":
        raise ConfigError(f"eval.semi.use_head: {pre.path} is a {cfg.method} checkpoint; the head to copy is the "
                          "DINO projection head. Set eval.semi.use_head=false for a new head")
    if cfg.dino.num_layers < 3 or not cfg.dino.use_bn_in_head:
        raise ConfigError(f"eval.semi.use_head: the DINO head of {pre.path} has no two Linear+BN layers "
                          f"(dino.num_layers={cfg.dino.num_layers}, use_bn_in_head={cfg.dino.use_bn_in_head}); "
                          "set eval.semi.use_head=false")
    head = dino_head_state(pre.path, pre.weights)
    if not head:
        raise ConfigError(f"eval.semi.use_head: {pre.path} holds no {pre.weights} DINO head (an imported reference "
                          "checkpoint keeps the backbone only); set eval.semi.use_head=false")
    return head


def build_model(pre, num_classes: int, use_head: bool) -> SemiModel:
    head = check_head(pre, use_head)
    if not use_head:
        return SemiModel(pre.backbone, HIDDEN, num_classes)
    model = SemiModel(pre.backbone, pre.cfg.dino.hidden_dim, num_classes)
    missing, unexpected = model.head.load_state_dict(head, strict=False)
    missing = [k for k in missing if not k.startswith("fc3.")]
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{pre.path}: the DINO head does not fit the semi-supervised head "
                                   f"({'missing' if missing else 'unexpected'} {(missing or unexpected)[0]!r})")
    return model


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------
def main(args) -> int:
    def check(pre, cfg):  # before anything is written: the subset, the head, the subset's files
        full = list_samples(cfg.data.root, cfg.data.train_split, cfg.data.format, check=False)
        if args.subset in ("1", "10"):
            indices = draw_subset(full.labels, int(args.subset), cfg.eval.semi.seed)
        else:
            indices = read_subset(Path(args.subset), full)
        check_head(pre, cfg.eval.semi.use_head)
        return full, indices, subset_samples(cfg, indices, full)

    run = setup(args, "semi", "semi", lambda cfg: (cfg.data.train_split, cfg.data.val_split), check)
    cfg, semi_cfg = run.cfg, run.cfg.eval.semi
    full, indices, samples = run.checked
    try:
        if args.subset in ("1", "10"):
            percent = float(args.subset)
            subset_file = run.out / f"subset_{args.subset}percent_seed{semi_cfg.seed}.txt"
            if run.rank == 0:
                write_subset(subset_file, full, indices)
        else:
            subset_file = Path(args.subset).resolve()
            percent = 100.0 * len(indices) / len(full)
        epochs = semi_cfg.epochs or (EPOCHS[1] if percent <= 5 else EPOCHS[10])
        model = build_model(run.pre, len(full.classes), semi_cfg.use_head).to(run.device)
        if run.world > 1 and cfg.model.sync_bn and run.device.type == "cuda":
            model = sync_batchnorm(model)  # CUDA-only in PyTorch
        if run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        common = dict(rank=run.rank, world_size=run.world, channels_last=run.channels_last, batch_size=semi_cfg.batch_size)
        # Several processes drop the last partial batch so that every rank runs the same number of steps;
        # one process only when that batch would hold a single image (train-mode BatchNorm1d cannot).
        drop_last = run.world > 1 or len(samples) % semi_cfg.batch_size == 1
        train_loader = build_eval_loader(cfg, "train", train_augment=True, samples=samples, drop_last=drop_last,
                                         **common)
        val_loader = build_eval_loader(cfg, "val", **common)
        global_batch = semi_cfg.batch_size * run.world
        peak = semi_cfg.lr * global_batch / REF_LR_BATCH
        optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, nesterov=True, weight_decay=0.0)
        settings = {"checkpoint": str(run.pre.path.resolve()), "weights": run.pre.weights, "subset": str(subset_file),
                    "subset_images": len(samples), "epochs": epochs, "peak_lr": peak, "global_batch": global_batch,
                    "use_head": semi_cfg.use_head, "crop": cfg.eval.crop, "resize": cfg.eval.resize,
                    "backend": cfg.data.backend}
        loop = EpochLoop(run, model, model, optimizer, epoch_lrs(peak, epochs), train_loader, val_loader, settings)
        if run.resume_from is not None:
            loop.load(run.resume_from)
        log.info(f"semi-supervised: {len(samples)} labelled images ({percent:.2f}% of {len(full)}), SGD Nesterov, "
                 f"peak LR {peak:.4g} at global batch {global_batch}, {epochs} epochs of "
                 f"{train_loader.steps_per_epoch} steps, head {'from the DINO head' if semi_cfg.use_head else 'new'}")
        history = loop.fit()
    finally:
        finish(run)
    if not history:
        return 0
    result = {"backbone": run.pre.cfg.model.backbone, "method": run.pre.cfg.method, "pretrain_epoch": run.pre.epoch,
              "protocol": "semi-supervised fine-tuning (reference)", **settings, "subset_percent": percent,
              "steps": loop.step, "complete": history[-1]["epoch"] == epochs, **summarize(history)}
    if run.rank == 0:
        write_json(run.out / "eval_semi.json", result)
        log.info(f"semi ({len(samples)} images): best val top-1 {result['top1_best']:.2f}% "
                 f"(epoch {result['best_epoch']}), "
                 f"last {result['top1_last']:.2f}%; written to {run.out / 'eval_semi.json'}")
    return 0
