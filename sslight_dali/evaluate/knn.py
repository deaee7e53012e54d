"""`sslight eval knn CHECKPOINT`: the pre-training monitor's weighted kNN as a command.

eval.knn_mode=val_loo is the reference's monitor (leave-one-out on val; not comparable with published
kNN numbers), train_val the standard DINO protocol (train-set bank, val queries). Features are extracted
on every rank, each over its own shard, and gathered.
"""
from __future__ import annotations

import logging

import torch

from ..knn import knn_evaluate
from .common import finish, setup, write_json

log = logging.getLogger("sslight")


def main(args) -> int:
    def splits(cfg):
        return (cfg.data.val_split,) + ((cfg.data.train_split,) if cfg.eval.knn_mode == "train_val" else ())

    run = setup(args, "knn", None, splits)
    cfg = run.cfg
    try:
        backbone = run.pre.backbone.to(run.device)
        if run.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        res, _, _ = knn_evaluate(cfg, backbone, run.device, run.amp, run.rank, run.world, run.channels_last)
    finally:
        finish(run)
    result = {"backbone": run.pre.cfg.model.backbone, "method": run.pre.cfg.method, "pretrain_epoch": run.pre.epoch,
              "checkpoint": str(run.pre.path.resolve()), "weights": run.pre.weights, "mode": cfg.eval.knn_mode,
              "k": res["k"], "temperature": cfg.eval.knn_t, "top1": res["top1"], "top5": res["top5"],
              "val_images": res["n"], "crop": cfg.eval.crop, "resize": cfg.eval.resize}
    if run.rank == 0:
        write_json(run.out / "eval_knn.json", result)
        log.info(f"kNN ({cfg.eval.knn_mode}, k={res['k']}, T={cfg.eval.knn_t}): top-1 {res['top1']:.2f}% "
                 f"top-5 {res['top5']:.2f}% on {res['n']} val images; written to {run.out / 'eval_knn.json'}")
    return 0
