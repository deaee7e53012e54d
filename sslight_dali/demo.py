"""`sslight demo`: the main job end to end on the embedded synthetic dataset, in a few minutes.

Makes the dataset, measures kNN top-1 and the fast linear probe (`sslight eval linear` with
eval.linear.protocol=fast) of a randomly initialised backbone, pre-trains DINO-SSLight on the DALI
pipeline (GPU where present, CPU otherwise), measures both again and says how fast it went.
The recipe's views (scales, counts, augmentations, loss weights) are the paper's; what is scaled down
for a run of a few hundred steps on 1,000 images is listed in COMMON, CPU and GPU below.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_CONFIG = "configs/dino/resnet18_sslight.yaml"

# The demo's data: shapes in two colours (black/white, either way round) on a flat background. Self-
# supervised training learns what tells two images apart; with random colours and textured
# backgrounds (the bench data) that is colour and texture, which say nothing about the shape classes,
# and a run of minutes learns nothing a kNN on shapes can use.
DEMO_DATA = dict(classes=10, per_class=100, val_per_class=30, clutter=0.0, colors=2)

# Small-scale settings: a short schedule (warm-up shortened to match) and a smaller DINO head for ~1k
# images. The reference's DINO settings drift towards a uniform output within a few hundred steps, so
# here the teacher follows the student faster (0.99), stays sharp (0.04 throughout), its center moves
# slower (0.99), and the LR is 10x the reference's (the README's demo section has the measurements).
COMMON = [
    "train.epochs=12", "optim.warmup_epochs=1", "optim.base_lr=4.8", "dino.out_dim=1024",
    "dino.momentum_teacher=0.99", "dino.warmup_teacher_temp=0.04", "dino.teacher_temp=0.04",
    "dino.center_momentum=0.99", "train.knn_every=3", "train.log_every=10", "train.joint_linear_probe=true",
    "eval.knn_mode=train_val", "eval.knn_k=10",
]
CPU = ["train.batch_size=64", "recipe.global.size=64", "recipe.local.size=32", "eval.resize=73", "eval.crop=64",
       "data.num_threads=2"]
GPU = ["train.batch_size=128", "recipe.global.size=128", "recipe.local.size=64", "eval.resize=146", "eval.crop=128",
       "train.epochs=100", "optim.warmup_epochs=10", "train.knn_every=10"]


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoint, logs, config)")
    p.add_argument("--data", default="data/demo", help="where the demo dataset is (made if missing)")
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("overrides", nargs="*", help="extra config overrides, applied last")


def knn_top1(cfg, backbone, device) -> float:
    from .knn import knn_evaluate  # light: `sslight demo --help` loads no torch
    return knn_evaluate(cfg, backbone, device)[0]["top1"]


def probe_top1(cfg, backbone, device) -> float:
    from .evaluate.linear import fast_probe  # light: as knn_top1
    return fast_probe(cfg, backbone, device)["top1_best"]


def main(args) -> int:
    # light: `sslight demo --help` loads no torch
    import torch

    from .checkpoint import LATEST
    from .run_config import load_config
    from .models import build_backbone
    from .pretrained import load_pretrained
    from .runtime import seed_everything
    from .synth import synth_dataset
    from .train import train

    on_gpu = torch.cuda.is_available()
    data = Path(args.data)
    if not (data / "synth.json").is_file():
        print(f"making the demo dataset in {data} ...")
        synth_dataset(data, **DEMO_DATA)
    # A re-run moves the previous demo run aside (to <out>.old-<time>) instead of refusing.
    overrides = COMMON + (GPU if on_gpu else CPU) + [f"data.root={data}", f"train.output_dir={args.out}",
                                                   "train.overwrite=true"]
    cfg = load_config(args.config, overrides + list(args.overrides))
    device = torch.device("cuda" if on_gpu else "cpu")

    seed_everything(cfg.train.seed)
    random_backbone = build_backbone(cfg.model.backbone).to(device)
    before = knn_top1(cfg, random_backbone, device)
    probe_before = probe_top1(cfg, random_backbone, device)
    print(f"randomly initialised {cfg.model.backbone}: kNN top-1 {before:.1f}%, fast linear probe top-1 "
          f"{probe_before:.1f}%")

    t0 = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - t0) / 60

    trained = load_pretrained(Path(args.out) / LATEST).backbone.to(device)  # the student, as training's kNN
    after = knn_top1(cfg, trained, device)
    probe_after = probe_top1(cfg, trained, device)

    records = [json.loads(line) for line in open(Path(args.out) / "metrics.jsonl")]
    train_recs = [r for r in records if r.get("kind") == "train"]
    knn_by_epoch = {0: round(before, 2)} | {r["epoch"]: round(r["knn_top1"], 2) for r in records if r.get("kind") == "eval"}
    train_recs = train_recs[1:] or train_recs  # the first interval includes start-up
    ips = sorted(r["images_per_sec"] for r in train_recs)
    wait = sorted(r["data_wait"] for r in train_recs)
    median = lambda xs: xs[len(xs) // 2] if xs else float("nan")  # noqa: E731
    summary = {
        "backbone": cfg.model.backbone, "recipe": cfg.recipe.name, "device": str(device),
        "epochs": result["epochs"], "steps": result["steps"], "minutes": round(minutes, 2),
        "knn_top1_random_init": round(before, 2), "knn_top1_trained": round(after, 2), "knn_top1_by_epoch": knn_by_epoch,
        # eval.linear.protocol=fast: the best val top-1 of a linear layer on cached centre-crop features
        "linear_fast_top1_random_init": round(probe_before, 2), "linear_fast_top1_trained": round(probe_after, 2),
        "images_per_sec_median": round(median(ips), 1), "data_wait_median": round(median(wait), 4),
        "checkpoint": str(Path(args.out) / LATEST), "metrics": str(Path(args.out) / "metrics.jsonl"),
        "log": str(Path(args.out) / "train.log"), "tensorboard": str(Path(args.out) / "tensorboard"),
    }
    (Path(args.out) / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print("=" * 72)
    print(f"DINO-SSLight {cfg.model.backbone} on {summary['device']}: {summary['epochs']} epochs, "
          f"{summary['steps']} steps in {summary['minutes']:.1f} min")
    print(f"kNN top-1 (k={cfg.eval.knn_k}, train bank -> val): random init {before:.1f}%  ->  trained {after:.1f}%  "
          f"({after - before:+.1f} points)")
    print(f"fast linear probe top-1 (cached centre-crop features, not the paper's protocol): random init "
          f"{probe_before:.1f}%  ->  trained {probe_after:.1f}%  ({probe_after - probe_before:+.1f} points)")
    print("kNN top-1 by epoch: " + ", ".join(f"{e}: {v:.1f}%" for e, v in knn_by_epoch.items()))
    print(f"throughput: {summary['images_per_sec_median']:.0f} images/s (median), "
          f"data-wait {100 * summary['data_wait_median']:.1f}% of step time")
    print(f"checkpoint: {summary['checkpoint']}\nlogs: {summary['log']}, {summary['metrics']}, {summary['tensorboard']}")
    print("=" * 72)
    return 0
