"""Runs: one bench with one set of overrides -> one JSON record (the dataset, the bench, the record)."""
from __future__ import annotations

import datetime
import gc
import json
import os
import sys
from pathlib import Path

from ..config import to_dict
from ..files import atomic_write
from .environment import hw_decoder_info, static_environment
from .timing import BenchError, summarize

BENCH_DATA = Path("data/bench_synth")
# ImageNet-like JPEGs (~400x350 px, quality 95) so decode costs what it costs on real data.
BENCH_SYNTH = dict(classes=10, per_class=100, val_per_class=1, seed=0, min_side=350, max_side=500, quality=95)
BENCH_COPIES = 10  # hard links per unique image under train/: 10,000 files per epoch


def flag_overrides(args) -> list[str]:
    """The shortcut flags as config overrides, so a record's `overrides` says everything that was set."""
    flags = (("backend", "data.backend"), ("device", "data.device"), ("threads", "data.num_threads"),
             ("prefetch", "data.prefetch"), ("hw_decoder_load", "data.hw_decoder_load"),
             ("batch_size", "train.batch_size"), ("data", "data.root"), ("compile", "train.compile"))
    return [f"{key}={getattr(args, a)}" for a, key in flags if getattr(args, a, None) is not None]


def run_one(args, extra: list[str] = (), label: str | None = None, kind: str | None = None) -> dict:
    """Load the config with the user's overrides, the flags and `extra` (in that order), run, record."""
    from ..run_config import load_config  # light: loading a config by its method imports the methods (torch)
    kind = kind or args.bench_command
    overrides = list(args.overrides) + flag_overrides(args) + list(extra)
    cfg = load_config(args.config, overrides)
    dataset = resolve_dataset(cfg) if kind != "model" else None
    if kind != "model" and cfg.data.backend == "torchvision" and args.steps < 3 * cfg.data.num_threads:
        # Each worker delivers a whole batch at a time, so batches arrive in bursts of up to one per worker.
        print(f"warning: --steps {args.steps} is under 3 x {cfg.data.num_threads} DataLoader workers: "
              "batches arrive in bursts and the figure will be noisy", file=sys.stderr)
    from . import benches  # light: the benches load torch, the loaders and the trainer
    result = benches.BENCHES[kind](cfg, args.warmup, args.steps, args.repeats)
    result.update(warmup=args.warmup, steps=args.steps)
    return make_record(kind, cfg, args.config, overrides, result, dataset, label)


def release_memory() -> None:
    """Free the previous run's loader (DALI threads, DataLoader workers, GPU pools) before the next."""
    gc.collect()
    import torch  # light: torch (`sslight bench --help` loads none)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        try:
            from nvidia.dali.backend import ReleaseUnusedMemory  # optional: DALI
            ReleaseUnusedMemory()
        except ImportError:
            pass


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------
def resolve_dataset(cfg) -> dict:
    """Point cfg.data.root at an existing dataset (the synthetic bench set if none given); describe it."""
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
        if not root.is_dir():
            raise BenchError(f"--data / data.root: dataset directory not found: {root}")
    else:
        root = ensure_bench_data()
        cfg.data.root = str(root)
    return dataset_info(cfg)


def ensure_bench_data(root: Path = BENCH_DATA) -> Path:
    """The synthetic bench set: BENCH_SYNTH's unique JPEGs, each linked BENCH_COPIES times under train/.
    Copies cost nothing to make and decode exactly like the original, and a long epoch keeps every
    DataLoader worker busy (a 1000-image epoch at batch 128 has 7 batches: 16 workers would idle)."""
    from ..synth import synth_dataset  # light: numpy
    if not _synth_matches(root / "synth.json"):
        print(f"writing the synthetic bench dataset to {root} (once)", file=sys.stderr)
        synth_dataset(root, **BENCH_SYNTH, workers=os.cpu_count() or 1)
    marker = root / "bench_copies.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("copies") != BENCH_COPIES:
        for f in sorted((root / "train").rglob("*.jpg")):
            if ".copy" in f.name:
                continue
            for k in range(1, BENCH_COPIES):
                dst = f.with_name(f"{f.stem}.copy{k}.jpg")
                if not dst.exists():
                    os.link(f, dst)
        marker.write_text(json.dumps({"copies": BENCH_COPIES}))
    return root


def _synth_matches(meta: Path) -> bool:
    if not meta.is_file():
        return False
    got = json.loads(meta.read_text())
    want = dict(BENCH_SYNTH, train_per_class=BENCH_SYNTH["per_class"])
    return all(got.get(k) == want[k] for k in ("classes", "train_per_class", "seed", "min_side", "max_side",
                                                 "quality"))


def dataset_info(cfg) -> dict:
    from ..data import list_samples  # light: torch (`sslight bench --help` loads none)
    samples = list_samples(cfg.data.root, cfg.data.train_split, cfg.data.format, check=False)
    sizes = [samples.size(i) for i in range(len(samples))]
    unique = {os.stat(f).st_ino for f in samples.files} if samples.storage == "files" else samples.files
    return {"path": str(Path(cfg.data.root).resolve()), "split": cfg.data.train_split, "format": cfg.data.format,
            "images": len(samples), "unique_files": len(unique), "classes": len(samples.classes),
            "mean_file_bytes": sum(sizes) / len(sizes) if sizes else 0.0}


# ------------------------------------------------------------------------------------------------
# The record (the environment comes from environment.py)
# ------------------------------------------------------------------------------------------------
def make_record(kind: str, cfg, config_path: str, overrides: list[str], result: dict, dataset: dict | None,
                label: str | None = None) -> dict:
    """The one JSON record of a run; the key figures at the top level."""
    from ..runtime import resolve_precision, torch_device  # light: torch (`sslight bench --help` loads none)
    ips = [r["images_per_sec"] for r in result["repeats"]]
    s = summarize(ips)
    device = result.get("extra", {}).get("compute_device") or result["device"]
    rec = {
        "bench": kind, "label": label or f"{result['backend']}-{result['device']}",
        "images_per_sec": s["median"], "images_per_sec_min": s["min"], "images_per_sec_max": s["max"],
        "repeats": len(ips), "ms_per_image": 1000.0 / s["median"],
        # CPU time of the whole process (every thread, DataLoader workers too) per image, median of the repeats
        "cpu_ms_per_image": summarize([r["cpu_ms_per_image"] for r in result["repeats"]])["median"],
        "cpu_cores_busy": summarize([r["cpu_cores_busy"] for r in result["repeats"]])["median"],
        "backend": result["backend"], "device": result["device"], "config": str(config_path),
        "overrides": list(overrides),
        "method": cfg.method, "backbone": cfg.model.backbone, "recipe": cfg.recipe.name,
        "views": [f"{g.count}x{g.size}" for g in (cfg.recipe.global_, cfg.recipe.local) if g.count],
        "batch_size": cfg.train.batch_size, "num_threads": cfg.data.num_threads, "prefetch": cfg.data.prefetch,
        "pipelines": result.get("pipelines"),  # DALI pipelines per process the loader ran (None: torchvision)
        "hw_decoder_load": cfg.data.hw_decoder_load,
        "precision": resolve_precision(cfg, torch_device(device)), "channels_last": cfg.train.channels_last,
        "warmup_batches": result["warmup"], "steps_per_repeat": result["steps"],
        "per_repeat": result["repeats"],
        **{k: v for k, v in result.get("extra", {}).items()},
        "dataset": dataset,
        "env": {**static_environment(), "load_average": list(os.getloadavg()),
                "hw_jpeg_decoder": hw_decoder_info(cfg, result)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resolved_config": to_dict(cfg),
    }
    return rec


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")
