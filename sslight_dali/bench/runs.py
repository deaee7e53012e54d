"""Runs: one bench with one set of overrides -> one JSON record (dataset, the three benches, the record)."""
from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ..files import atomic_write
from .environment import hw_decoder_info, static_environment
from .timing import BenchError, GpuMemory, endless, measure, summarize, synchronizer

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
    from ..run_config import load_config
    kind = kind or args.bench_command
    overrides = list(args.overrides) + flag_overrides(args) + list(extra)
    cfg = load_config(args.config, overrides)
    dataset = resolve_dataset(cfg) if kind != "model" else None
    if kind != "model" and cfg.data.backend == "torchvision" and args.steps < 3 * cfg.data.num_threads:
        # Each worker delivers a whole batch at a time, so batches arrive in bursts of up to one per worker.
        print(f"warning: --steps {args.steps} is under 3 x {cfg.data.num_threads} DataLoader workers: "
              "batches arrive in bursts and the figure will be noisy", file=sys.stderr)
    bench = {"pipeline": bench_pipeline, "model": bench_model, "train": bench_train}[kind]
    result = bench(cfg, args.warmup, args.steps, args.repeats)
    result.update(warmup=args.warmup, steps=args.steps)
    return make_record(kind, cfg, args.config, overrides, result, dataset, label)


def release_memory() -> None:
    """Free the previous run's loader (DALI threads, DataLoader workers, GPU pools) before the next."""
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        try:
            from nvidia.dali.backend import ReleaseUnusedMemory
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
    from ..synth import synth_dataset
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
    from ..data import list_samples
    samples = list_samples(cfg.data.root, cfg.data.train_split, cfg.data.format, check=False)
    sizes = [samples.size(i) for i in range(len(samples))]
    unique = {os.stat(f).st_ino for f in samples.files} if samples.members is None else samples.files
    return {"path": str(Path(cfg.data.root).resolve()), "split": cfg.data.train_split, "format": cfg.data.format,
            "images": len(samples), "unique_files": len(unique), "classes": len(samples.classes),
            "mean_file_bytes": sum(sizes) / len(sizes) if sizes else 0.0}


# ------------------------------------------------------------------------------------------------
# The three benches
# ------------------------------------------------------------------------------------------------
def _loader_layout(cfg) -> dict:
    from ..runtime import uses_channels_last
    return {"channels_last": uses_channels_last(cfg)}


def bench_pipeline(cfg, warmup: int, steps: int, repeats: int) -> dict:
    from ..data import build_train_loader
    memory = GpuMemory()
    loader = build_train_loader(cfg, **_loader_layout(cfg))
    reps = measure(endless(loader), None, warmup, steps, repeats, synchronizer(loader.device == "gpu"))
    return {"repeats": reps, "backend": cfg.data.backend, "device": loader.device,
            "pipelines": getattr(loader, "pipelines", None), "extra": {"gpu_memory": memory.read()}}


class SyntheticLoader:
    """The loader interface over one batch of pre-made device tensors, yielded again and again:
    what the trainer could do if data were free."""

    def __init__(self, views, labels, num_classes: int, steps_per_epoch: int = 1000):
        import torch
        self.views, self.labels = views, labels
        self.indices = torch.arange(labels.shape[0], device=labels.device)
        self.num_classes, self.steps_per_epoch = num_classes, steps_per_epoch
        self.num_samples = steps_per_epoch * labels.shape[0]
        self.device = "gpu" if labels.is_cuda else "cpu"

    @classmethod
    def random(cls, cfg, device, num_classes: int) -> "SyntheticLoader":
        """Views of the recipe's shapes, layout and dtype, as the real loader delivers them."""
        import torch
        from ..runtime import torch_dtype
        dtype = torch_dtype(cfg.data.dtype)
        fmt = torch.channels_last if _loader_layout(cfg)["channels_last"] else torch.contiguous_format
        b = cfg.train.batch_size
        views = [torch.randn(b, 3, v.size, v.size, device=device, dtype=dtype).contiguous(memory_format=fmt)
                 for v in cfg.recipe.views()]
        return cls(views, torch.randint(0, num_classes, (b,), device=device), num_classes)

    def epoch(self, epoch: int):
        for _ in range(self.steps_per_epoch):
            yield self.views, self.labels, self.indices

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _BenchTrainer:
    """A Trainer writing to a throw-away directory, set up as `sslight train` sets it up."""

    def __init__(self, cfg, loader, device):
        self.cfg, self.loader, self.device = cfg, loader, device

    def __enter__(self):
        from ..runtime import prepare_process
        from ..train import Trainer
        prepare_process(self.cfg.train.seed, self.device)
        self.cfg.train.tensorboard = False
        self.tmp = tempfile.TemporaryDirectory(prefix="sslight-bench-")
        self.trainer = Trainer(self.cfg, self.loader, 0, 1, self.device, Path(self.tmp.name))
        self.trainer.method.on_epoch_start(0)
        return self.trainer

    def __exit__(self, *exc):
        self.trainer.logger.close()
        self.tmp.cleanup()


def trainer_step(trainer, device):
    def step(views, labels):
        # As Trainer.fit does: host batches are copied here; device batches pass through untouched.
        views = [v.to(device, non_blocking=True) for v in views]
        trainer.train_step(views, labels.to(device, non_blocking=True))
    return step


class FirstCall:
    """A bench step that times its first call: torch.compile compiles the networks there (and on a GPU
    cuDNN picks its kernels), so that is the start-up cost beside the steady figure."""

    def __init__(self, step, sync):
        self.step, self.sync, self.seconds = step, sync, None

    def __call__(self, views, labels):
        if self.seconds is not None:
            return self.step(views, labels)
        t0 = time.perf_counter()
        self.step(views, labels)
        self.sync()
        self.seconds = time.perf_counter() - t0


def startup(cfg, first: FirstCall, steady_ips: float) -> dict:
    """first_step_s: the first step's wall time; compile_s (train.compile only): what it took beyond a
    steady step of the `model` figure."""
    compile_s = first.seconds - cfg.train.batch_size / steady_ips if cfg.train.compile else None
    return {"compile": cfg.train.compile, "first_step_s": first.seconds, "compile_s": compile_s}


def compute_device(cfg):
    from ..runtime import init_distributed
    return init_distributed(cfg)[2]


def bench_model(cfg, warmup: int, steps: int, repeats: int) -> dict:
    device = compute_device(cfg)
    memory = GpuMemory()
    # 1000 classes (ImageNet) for the joint linear probe unless the config says otherwise.
    fake = SyntheticLoader.random(cfg, device, cfg.train.num_classes or 1000)
    sync = synchronizer(device.type == "cuda")
    with _BenchTrainer(cfg, fake, device) as trainer:
        step = FirstCall(trainer_step(trainer, device), sync)
        reps = measure(endless(fake), step, warmup, steps, repeats, sync)
    ips = summarize([r["images_per_sec"] for r in reps])["median"]
    return {"repeats": reps, "backend": "synthetic", "device": device.type,
            "extra": {**startup(cfg, step, ips), "gpu_memory": memory.read()}}


def bench_train(cfg, warmup: int, steps: int, repeats: int) -> dict:
    """The real loader into the Trainer; then the same Trainer on one of the loader's own batches,
    held on the device (the `model` figure beside it, with identical shapes, layout and dtype)."""
    from ..data import build_train_loader
    device = compute_device(cfg)
    memory = GpuMemory()
    loader = build_train_loader(cfg, **_loader_layout(cfg))
    sync = synchronizer(device.type == "cuda" or loader.device == "gpu")
    with _BenchTrainer(cfg, loader, device) as trainer:
        step, batches = FirstCall(trainer_step(trainer, device), sync), endless(loader)
        views, labels = next(batches)[:2]
        fake = SyntheticLoader([v.to(device).clone() for v in views], labels.to(device).clone(), loader.num_classes)
        train = measure(batches, step, warmup, steps, repeats, sync)
        model = measure(endless(fake), step, warmup, steps, repeats, sync)
    train_ips = summarize([r["images_per_sec"] for r in train])["median"]
    model_ips = summarize([r["images_per_sec"] for r in model])
    return {"repeats": train, "backend": cfg.data.backend, "device": loader.device,
            "pipelines": getattr(loader, "pipelines", None), "extra": {
        "compute_device": device.type,
        "data_wait_fraction": summarize([r["data_wait_fraction"] for r in train])["median"],
        "model": {"images_per_sec": model_ips["median"], "images_per_sec_min": model_ips["min"],
                  "images_per_sec_max": model_ips["max"], "per_repeat": model},
        "ratio_to_model": train_ips / model_ips["median"],
        **startup(cfg, step, model_ips["median"]),
        "gpu_memory": memory.read()}}


# ------------------------------------------------------------------------------------------------
# The record (the environment comes from environment.py)
# ------------------------------------------------------------------------------------------------
def make_record(kind: str, cfg, config_path: str, overrides: list[str], result: dict, dataset: dict | None,
                label: str | None = None) -> dict:
    """The one JSON record of a run; the key figures at the top level."""
    from ..config import to_dict
    from ..runtime import resolve_precision, torch_device
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
