"""Side-by-side throughput: DALI vs torchvision on the same JPEGs, equal threads (not a unit test).

python -m sslight_dali.data.bench [CONFIG] [--images 200] [--threads 2] [--batch 32] [--repeats 3]
Reports images/s, the median of `repeats` epochs after one warm-up epoch per loader.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from ..config import load_config
from ..synth import synth_dataset
from .build import build_train_loader


def images_per_second(loader, epochs: range) -> list[float]:
    rates = []
    for e in epochs:
        t, n = time.perf_counter(), 0
        for views, _, _ in loader.epoch(e):
            n += views[0].shape[0]
        rates.append(n / (time.perf_counter() - t))
    return rates


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?", default="configs/dino/resnet18_sslight.yaml")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench_")
    synth_dataset(root, classes=4, per_class=a.images // 4, val_per_class=1, min_side=350, max_side=500)
    for backend in ("dali", "torchvision"):
        cfg = load_config(a.config, [f"data.root={root}", f"data.backend={backend}", f"data.device={a.device}",
                                     f"data.num_threads={a.threads}", f"train.batch_size={a.batch}", *a.overrides])
        loader = build_train_loader(cfg)
        rates = images_per_second(loader, range(1 + a.repeats))[1:]
        print(f"{backend:12s} {statistics.median(rates):7.1f} img/s  (runs: {', '.join(f'{r:.1f}' for r in rates)})",
              flush=True)


if __name__ == "__main__":
    main()
