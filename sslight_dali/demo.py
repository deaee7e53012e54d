"""`sslight demo`: the main job end to end on the embedded synthetic dataset, in a few minutes.

Makes the dataset, measures kNN top-1 of a randomly initialised backbone, pre-trains DINO-SSLight on
the DALI pipeline (GPU where present, CPU otherwise), measures kNN again and says how fast it went.
On the CPU the crops are scaled down (global 64 px, local 32 px) so that the demo finishes in minutes;
the recipe's scales, loss weights and augmentations are otherwise the paper's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_CONFIG = "configs/dino/resnet18_sslight.yaml"

# Small-scale settings: a short schedule (warm-up and teacher-temperature ramp shortened to match),
# a smaller DINO head for ~1k images, and (CPU only) smaller crops.
COMMON = [
    "train.epochs=12", "optim.warmup_epochs=1", "dino.warmup_teacher_temp_epochs=3",
    "dino.out_dim=1024", "train.knn_every=0", "train.log_every=10", "train.joint_linear_probe=true",
    "eval.knn_mode=train_val", "eval.knn_k=10",
]
CPU = ["train.batch_size=64", "recipe.global.size=64", "recipe.local.size=32", "eval.resize=73", "eval.crop=64",
       "data.num_threads=2"]
GPU = ["train.batch_size=128", "recipe.global.size=128", "recipe.local.size=64", "eval.resize=146", "eval.crop=128",
       "train.epochs=150", "optim.warmup_epochs=10", "dino.warmup_teacher_temp_epochs=30"]


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoint, logs, config)")
    p.add_argument("--data", default="data/synth", help="where the synthetic dataset is (made if missing)")
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("overrides", nargs="*", help="extra config overrides, applied last")


def knn_top1(cfg, backbone, device) -> float:
    from .knn import knn_evaluate
    return knn_evaluate(cfg, backbone, device)[0]["top1"]


def main(args) -> int:
    import torch

    from .config import load_config
    from .models import build_backbone
    from .synth import synth_dataset
    from .train import seed_everything, train

    on_gpu = torch.cuda.is_available()
    data = Path(args.data)
    if not (data / "synth.json").is_file():
        print(f"making the synthetic dataset in {data} ...")
        synth_dataset(data, classes=10, per_class=100, val_per_class=30)
    overrides = COMMON + (GPU if on_gpu else CPU) + [f"data.root={data}", f"train.output_dir={args.out}"]
    cfg = load_config(args.config, overrides + list(args.overrides))
    device = torch.device("cuda" if on_gpu else "cpu")

    seed_everything(cfg.train.seed)
    random_backbone = build_backbone(cfg.model.backbone).to(device)
    before = knn_top1(cfg, random_backbone, device)
    print(f"kNN top-1 of a randomly initialised {cfg.model.backbone}: {before:.1f}%")

    t0 = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - t0) / 60

    from .checkpoint import LATEST, load
    from .methods import build_method
    state = load(Path(args.out) / LATEST)
    num_classes = json.loads((data / "synth.json").read_text())["classes"]
    method = build_method(cfg, num_classes)
    method.load_state_dict(state["model"])
    trained = method.to(device).backbone
    after = knn_top1(cfg, trained, device)

    records = [json.loads(line) for line in open(Path(args.out) / "metrics.jsonl")]
    train_recs = [r for r in records if r.get("kind") == "train"]
    train_recs = train_recs[1:] or train_recs  # the first interval includes start-up
    ips = sorted(r["images_per_sec"] for r in train_recs)
    wait = sorted(r["data_wait"] for r in train_recs)
    median = lambda xs: xs[len(xs) // 2] if xs else float("nan")  # noqa: E731
    summary = {
        "backbone": cfg.model.backbone, "recipe": cfg.recipe.name, "device": str(device),
        "epochs": result["epochs"], "steps": result["steps"], "minutes": round(minutes, 2),
        "knn_top1_random_init": round(before, 2), "knn_top1_trained": round(after, 2),
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
    print(f"throughput: {summary['images_per_sec_median']:.0f} images/s (median), "
          f"data-wait {100 * summary['data_wait_median']:.1f}% of step time")
    print(f"checkpoint: {summary['checkpoint']}\nlogs: {summary['log']}, {summary['metrics']}, {summary['tensorboard']}")
    print("=" * 72)
    return 0
