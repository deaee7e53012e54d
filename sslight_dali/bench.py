"""`sslight bench`: images/sec of view sampling, of the model step, and of training end to end.

    sslight bench pipeline CONFIG   view sampling alone (decode + every view of the recipe)
    sslight bench model CONFIG      Trainer.train_step on pre-made device tensors (the compute ceiling)
    sslight bench train CONFIG      real loader + Trainer.train_step, with `model` run beside it
    sslight bench compare CONFIG    several backends/devices side by side, ratios, JSON + PNG

Every figure is the median over `--repeats` timed runs of `--steps` batches each, after `--warmup`
batches. Runs that are compared are measured one after another in the same process, each with its
own loader, so they never compete for the CPU. Each JSON record carries the environment (versions,
GPU, CPU, hardware JPEG decoder), the config and its overrides, and the dataset.

torch, DALI and matplotlib are imported inside functions: `sslight --help` must stay cheap.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ("pipeline", "model", "train", "compare")
BENCH_DATA = Path("data/bench_synth")
# ImageNet-like JPEGs (~400x350 px, quality 95) so decode costs what it costs on real data.
BENCH_SYNTH = dict(classes=10, per_class=100, val_per_class=1, seed=0, min_side=350, max_side=500, quality=95)
# Ops removed one at a time by --profile-ops: name -> overrides that take the op out of the graph
# (the DALI graph leaves out an op whose probability is 0, so this measures the op's full cost).
ABLATIONS = {
    "flip": ["recipe.augment.flip_p=0"],
    "color_jitter": ["recipe.augment.jitter_p=0"],
    "grayscale": ["recipe.augment.grayscale_p=0"],
    "gaussian_blur": ["recipe.global.blur_p=[0]", "recipe.local.blur_p=[0]"],
    "solarize": ["recipe.global.solarize_p=[0]", "recipe.local.solarize_p=[0]"],
    "local_views": ["recipe.local.count=0"],
}
BENCH_COPIES = 10  # hard links per unique image under train/: 10,000 files per epoch
HW_JPEG_GPUS = re.compile(r"\b(A100|A800|A30|H100|H800|H200|H20|GH200|B200|GB200)\b")


class BenchError(RuntimeError):
    """Bad bench input (missing directory, bad sweep spec); the message names it."""


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    helps = {"pipeline": "view sampling alone: decode + all views of the recipe",
             "model": "training steps on synthetic device tensors (compute ceiling)",
             "train": "training steps on the real pipeline, beside `model` (ratio, data-wait)",
             "compare": "several backends/devices side by side: table, ratios, JSON, PNG"}
    for name in COMMANDS:
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("config", help="training config, e.g. configs/dino/resnet18_sslight.yaml")
        p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (after the config)")
        g = p.add_argument_group("data and loader knobs (shortcuts for data.* / train.* overrides)")
        g.add_argument("--backend", choices=["dali", "torchvision"])
        g.add_argument("--device", choices=["auto", "gpu", "cpu"], help="where view sampling runs")
        g.add_argument("--threads", type=int, help="DALI CPU threads / torchvision workers")
        g.add_argument("--prefetch", type=int, help="DALI prefetch queue depth")
        g.add_argument("--hw-decoder-load", type=float, help="share of JPEGs for the hardware decoder")
        g.add_argument("--batch-size", type=int)
        g.add_argument("--data", help="ImageFolder root with train/ (default: synthetic set in data/bench_synth)")
        t = p.add_argument_group("measurement")
        t.add_argument("--repeats", type=int, default=5, help="timed runs; the figure is their median")
        t.add_argument("--steps", type=int, default=20, help="batches per timed run")
        t.add_argument("--warmup", type=int, default=5, help="untimed batches first")
        t.add_argument("--sweep", help="KEY=v1,v2,...: one run per value, e.g. train.batch_size=64,128,256")
        t.add_argument("--json", help="output JSON (default runs/bench/<command>-<config>.json)")
        t.add_argument("--png", help="output plot for compare/sweep/profile (default: the JSON path, .png)")
        if name == "pipeline":
            t.add_argument("--profile-ops", action="store_true",
                           help="per-op cost: the recipe with each op removed in turn, side by side")
        if name == "compare":
            t.add_argument("--variants", help="backend:device list, e.g. dali:gpu,dali:cpu,torchvision:cpu "
                                              "(default: those this machine can run)")
            t.add_argument("--bench", choices=["pipeline", "train"], default="pipeline",
                           help="what each variant runs")


def main(args: argparse.Namespace) -> int:
    try:
        if args.sweep and (args.bench_command == "compare" or getattr(args, "profile_ops", False)):
            raise BenchError("--sweep runs one bench per value: use it with pipeline, model or train "
                             "(not with compare or --profile-ops)")
        if args.bench_command == "compare":
            result, plot = run_compare(args), plot_compare
        elif args.sweep:
            result, plot = run_sweep(args), plot_sweep
        elif getattr(args, "profile_ops", False):
            result, plot = run_profile(args), plot_profile
        else:
            result, plot = run_one(args), None
    except _input_errors() as e:
        print(f"sslight bench: error: {e}", file=sys.stderr)
        return 2
    report(result)
    json_path = Path(args.json or default_json_path(args))
    write_json(result, json_path)
    print(f"wrote {json_path}")
    if plot is not None:
        png = Path(args.png or json_path.with_suffix(".png"))
        plot(result, png)
        print(f"wrote {png}")
    return 0


def _input_errors() -> tuple:
    """Errors that mean bad input (printed as one line); the data package needs DALI to import,
    and `bench model` must work on a machine without it."""
    try:
        from .data.sources import DataError
    except ImportError:
        return (BenchError,)
    return (BenchError, DataError)


def default_json_path(args) -> Path:
    kind = args.bench_command
    if args.bench_command != "compare" and args.sweep:
        kind += "-sweep-" + args.sweep.split("=", 1)[0].replace(".", "_")
    elif getattr(args, "profile_ops", False):
        kind += "-profile"
    return Path("runs/bench") / f"{kind}-{Path(args.config).stem}.json"


def flag_overrides(args) -> list[str]:
    """The shortcut flags as config overrides, so a record's `overrides` says everything that was set."""
    flags = (("backend", "data.backend"), ("device", "data.device"), ("threads", "data.num_threads"),
             ("prefetch", "data.prefetch"), ("hw_decoder_load", "data.hw_decoder_load"),
             ("batch_size", "train.batch_size"), ("data", "data.root"))
    return [f"{key}={getattr(args, a)}" for a, key in flags if getattr(args, a, None) is not None]


# ------------------------------------------------------------------------------------------------
# Runs: one bench with one set of overrides -> one record
# ------------------------------------------------------------------------------------------------
def run_one(args, extra: list[str] = (), label: str | None = None, kind: str | None = None) -> dict:
    """Load the config with the user's overrides, the flags and `extra` (in that order), run, record."""
    from .config import load_config
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


def run_sweep(args) -> dict:
    key, values = parse_sweep(args.sweep)
    runs = [run_one(args, [f"{key}={v}"], label=f"{key}={v}") for v in values]
    for rec, v in zip(runs, values):
        rec["sweep_value"] = v
    return {"sweep": {"key": key, "values": values}, "runs": runs}


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    key, sep, raw = spec.partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()] if sep else []
    if not key.strip() or not values:
        raise BenchError(f"--sweep {spec!r}: expected KEY=v1,v2,... e.g. train.batch_size=64,128,256")
    return key.strip(), values


def compare_variants(args) -> list[tuple[str, str]]:
    if args.variants:
        out = []
        for item in args.variants.split(","):
            backend, _, device = item.strip().partition(":")
            if backend not in ("dali", "torchvision") or device not in ("gpu", "cpu", "auto"):
                raise BenchError(f"--variants: {item!r} is not backend:device (dali|torchvision : gpu|cpu|auto)")
            out.append((backend, device))
        return out
    import torch
    if torch.cuda.is_available():
        return [("dali", "gpu"), ("dali", "cpu"), ("torchvision", "cpu")]
    return [("dali", "cpu"), ("torchvision", "cpu")]


def run_compare(args) -> dict:
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))  # "all cores" unless told otherwise
    runs = []
    for backend, device in compare_variants(args):
        extra = [f"data.backend={backend}", f"data.device={device}"]
        runs.append(run_one(args, extra, label=f"{backend}-{device}", kind=args.bench))
        release_memory()
    return {"runs": runs, "ratios": compare_ratios(runs)}


def compare_ratios(runs: list[dict]) -> dict:
    """images_per_sec of every earlier run over every later one, e.g. 'dali-cpu/torchvision-cpu'."""
    return {f"{a['label']}/{b['label']}": a["images_per_sec"] / b["images_per_sec"]
            for i, a in enumerate(runs) for b in runs[i + 1:]}


def run_profile(args) -> dict:
    """The full recipe, then the recipe with each op it uses taken out, then all photometric ops out."""
    from .config import load_config
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args))
    ops = [op for op in ABLATIONS if op_in_recipe(cfg.recipe, op)]
    photometric = [o for op in ops if op != "local_views" for o in ABLATIONS[op]]
    plan = [("full", [])] + [(f"no_{op}", ABLATIONS[op]) for op in ops] + [("crop_only", photometric)]
    runs = []
    for label, extra in plan:
        runs.append(run_one(args, extra, label=label, kind="pipeline"))
        release_memory()
    return {"runs": runs, "ops": op_costs(runs, ops, cfg.data.num_threads)}


def op_in_recipe(recipe, op: str) -> bool:
    a, groups = recipe.augment, (recipe.global_, recipe.local)
    return {"flip": a.flip_p > 0, "color_jitter": a.jitter_p > 0, "grayscale": a.grayscale_p > 0,
            "gaussian_blur": any(p > 0 for g in groups if g.count for p in g.blur_p),
            "solarize": any(p > 0 for g in groups if g.count for p in g.solarize_p),
            "local_views": recipe.local.count > 0}[op]


def op_costs(runs: list[dict], ops: list[str], threads: int) -> dict:
    """ms per image of each op = ms/image of the full recipe - ms/image without the op (wall time).
    `ms_per_image_range` bounds it from the runs' min/max: an op whose range spans 0 is below the noise.
    `thread_ms_per_image` scales by the thread count: the CPU time the op costs if all threads are busy."""
    med = {r["label"]: 1000.0 / r["images_per_sec"] for r in runs}
    fast = {r["label"]: 1000.0 / r["images_per_sec_max"] for r in runs}
    slow = {r["label"]: 1000.0 / r["images_per_sec_min"] for r in runs}
    out = {op: med["full"] - med[f"no_{op}"] for op in ops}
    rng = {op: [fast["full"] - slow[f"no_{op}"], slow["full"] - fast[f"no_{op}"]] for op in ops}
    out["decode_crop_normalize"] = med["crop_only"]
    rng["decode_crop_normalize"] = [fast["crop_only"], slow["crop_only"]]
    return {"ms_per_image": out, "ms_per_image_range": rng, "full_ms_per_image": med["full"], "threads": threads,
            "thread_ms_per_image": {k: v * threads for k, v in out.items()}}


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
    from .synth import synth_dataset
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
    from .data.sources import list_samples
    samples = list_samples(cfg.data.root, cfg.data.train_split, cfg.data.format, check=False)
    sizes = [samples.size(i) for i in range(len(samples))]
    unique = {os.stat(f).st_ino for f in samples.files} if samples.members is None else samples.files
    return {"path": str(Path(cfg.data.root).resolve()), "split": cfg.data.train_split, "format": cfg.data.format,
            "images": len(samples), "unique_files": len(unique), "classes": len(samples.classes),
            "mean_file_bytes": sum(sizes) / len(sizes) if sizes else 0.0}


# ------------------------------------------------------------------------------------------------
# Timing: one loop for every bench
# ------------------------------------------------------------------------------------------------
def summarize(values: list[float]) -> dict:
    """Median, min and max of the per-repeat figures."""
    if not values:
        raise ValueError("no values to summarize")
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def synchronizer(on_cuda: bool):
    """Wall time bracketed by a device-wide synchronize. CUDA events on torch's stream would miss
    DALI's work, which runs on DALI's own streams; synchronize waits for every stream."""
    if not on_cuda:
        return lambda: None
    import torch
    return torch.cuda.synchronize


def endless(loader):
    """Batches across epoch boundaries, as long as the caller wants them."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def measure(batches, step, warmup: int, steps: int, repeats: int, sync) -> list[dict]:
    """`warmup` untimed batches, then `repeats` timed runs of `steps` batches. `step(views, labels)`
    consumes a batch (None: view sampling alone). The host time spent in next() is the data wait."""
    if min(steps, repeats) < 1 or warmup < 0:
        raise BenchError(f"need --steps >= 1, --repeats >= 1, --warmup >= 0 (got {steps}, {repeats}, {warmup})")
    try:
        for _ in range(warmup):
            views, labels = next(batches)[:2]
            if step is not None:
                step(views, labels)
        sync()
        out = []
        for _ in range(repeats):
            wait, images = 0.0, 0
            start = time.perf_counter()
            for _ in range(steps):
                t = time.perf_counter()
                views, labels = next(batches)[:2]
                wait += time.perf_counter() - t
                if step is not None:
                    step(views, labels)
                images += labels.shape[0]
            sync()
            seconds = time.perf_counter() - start
            out.append({"seconds": seconds, "images": images, "images_per_sec": images / seconds,
                        "data_wait_fraction": wait / seconds})
        return out
    finally:
        batches.close()  # stops DataLoader workers now, not at some later garbage collection


class GpuMemory:
    """GPU memory a run adds: device-wide (cudaMemGetInfo, so DALI's pools count as well as torch's
    cache) and torch's own peak. None on a machine without CUDA."""

    def __init__(self):
        import torch
        self.on = torch.cuda.is_available()
        if self.on:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.free_before = torch.cuda.mem_get_info()[0]

    def read(self) -> dict | None:
        if not self.on:
            return None
        import torch
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {"device_used_delta_bytes": int(self.free_before - free),
                "torch_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "torch_max_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "device_total_bytes": int(total)}


# ------------------------------------------------------------------------------------------------
# The three benches
# ------------------------------------------------------------------------------------------------
def _loader_layout(cfg) -> dict:
    from .train import uses_channels_last
    return {"channels_last": uses_channels_last(cfg)}


def bench_pipeline(cfg, warmup: int, steps: int, repeats: int) -> dict:
    from .data import build_train_loader
    memory = GpuMemory()
    loader = build_train_loader(cfg, **_loader_layout(cfg))
    reps = measure(endless(loader), None, warmup, steps, repeats, synchronizer(loader.device == "gpu"))
    return {"repeats": reps, "backend": cfg.data.backend, "device": loader.device,
            "extra": {"gpu_memory": memory.read()}}


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
        dtype = torch.bfloat16 if cfg.data.dtype == "bfloat16" else torch.float32
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
        import torch
        from .train import Trainer, seed_everything
        seed_everything(self.cfg.train.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
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


def compute_device(cfg):
    from .train import init_distributed
    return init_distributed(cfg)[2]


def bench_model(cfg, warmup: int, steps: int, repeats: int) -> dict:
    device = compute_device(cfg)
    memory = GpuMemory()
    # 1000 classes (ImageNet) for the joint linear probe unless the config says otherwise.
    fake = SyntheticLoader.random(cfg, device, cfg.train.num_classes or 1000)
    with _BenchTrainer(cfg, fake, device) as trainer:
        reps = measure(endless(fake), trainer_step(trainer, device), warmup, steps, repeats,
                       synchronizer(device.type == "cuda"))
    return {"repeats": reps, "backend": "synthetic", "device": device.type,
            "extra": {"gpu_memory": memory.read()}}


def bench_train(cfg, warmup: int, steps: int, repeats: int) -> dict:
    """The real loader into the Trainer; then the same Trainer on one of the loader's own batches,
    held on the device (the `model` figure beside it, with identical shapes, layout and dtype)."""
    from .data import build_train_loader
    device = compute_device(cfg)
    memory = GpuMemory()
    loader = build_train_loader(cfg, **_loader_layout(cfg))
    sync = synchronizer(device.type == "cuda" or loader.device == "gpu")
    with _BenchTrainer(cfg, loader, device) as trainer:
        step, batches = trainer_step(trainer, device), endless(loader)
        views, labels = next(batches)[:2]
        fake = SyntheticLoader([v.to(device).clone() for v in views], labels.to(device).clone(), loader.num_classes)
        train = measure(batches, step, warmup, steps, repeats, sync)
        model = measure(endless(fake), step, warmup, steps, repeats, sync)
    train_ips = summarize([r["images_per_sec"] for r in train])["median"]
    model_ips = summarize([r["images_per_sec"] for r in model])
    return {"repeats": train, "backend": cfg.data.backend, "device": loader.device, "extra": {
        "compute_device": device.type,
        "data_wait_fraction": summarize([r["data_wait_fraction"] for r in train])["median"],
        "model": {"images_per_sec": model_ips["median"], "images_per_sec_min": model_ips["min"],
                  "images_per_sec_max": model_ips["max"], "per_repeat": model},
        "ratio_to_model": train_ips / model_ips["median"],
        "gpu_memory": memory.read()}}


# ------------------------------------------------------------------------------------------------
# Records and environment
# ------------------------------------------------------------------------------------------------
def make_record(kind: str, cfg, config_path: str, overrides: list[str], result: dict, dataset: dict | None,
                label: str | None = None) -> dict:
    """The one JSON record of a run; the key figures at the top level."""
    from .config import to_dict
    from .train import resolve_precision
    ips = [r["images_per_sec"] for r in result["repeats"]]
    s = summarize(ips)
    device = result.get("extra", {}).get("compute_device") or result["device"]
    rec = {
        "bench": kind, "label": label or f"{result['backend']}-{result['device']}",
        "images_per_sec": s["median"], "images_per_sec_min": s["min"], "images_per_sec_max": s["max"],
        "repeats": len(ips), "ms_per_image": 1000.0 / s["median"],
        "backend": result["backend"], "device": result["device"], "config": str(config_path),
        "overrides": list(overrides),
        "method": cfg.method, "backbone": cfg.model.backbone, "recipe": cfg.recipe.name,
        "views": [f"{g.count}x{g.size}" for g in (cfg.recipe.global_, cfg.recipe.local) if g.count],
        "batch_size": cfg.train.batch_size, "num_threads": cfg.data.num_threads, "prefetch": cfg.data.prefetch,
        "hw_decoder_load": cfg.data.hw_decoder_load,
        "precision": resolve_precision(cfg, _torch_device(device)), "channels_last": cfg.train.channels_last,
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


def _torch_device(kind: str):
    import torch
    return torch.device("cuda" if kind in ("gpu", "cuda") else "cpu")


_STATIC_ENV: dict = {}


def static_environment() -> dict:
    """Versions, GPU, driver, CPU: what does not change within a process (captured once)."""
    if _STATIC_ENV:
        return dict(_STATIC_ENV)
    import torch
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torchvision": _version("torchvision"), "timm": _version("timm"),
           "numpy": _version("numpy"), "pillow": _version("pillow"), **_dali_version(),
           "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_available": len(os.sched_getaffinity(0)),
           "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
           "gpu_name": None, "gpu_count": 0, "driver": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_bytes=int(props.total_memory),
                   gpu_compute_capability=f"{props.major}.{props.minor}", gpu_sm_count=props.multi_processor_count,
                   driver=nvidia_driver_version(), driver_cuda=_driver_cuda_version(),
                   cudnn=torch.backends.cudnn.version())
    _STATIC_ENV.update(env)
    return dict(env)


def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _dali_version() -> dict:
    # The wheel's name says its CUDA flavour (nvidia-dali-cuda120 / -cuda130).
    from importlib import metadata
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return {"dali": d.version, "dali_package": name}
    return {"dali": None, "dali_package": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver_version() -> str | None:
    """Kernel driver version from /proc (no nvidia-smi needed)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return m.group(1) if m else None


def _driver_cuda_version() -> str | None:
    """Highest CUDA version the driver supports, e.g. '13.0' (cuDriverGetVersion; best effort)."""
    import ctypes
    try:
        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


def hw_decoder_info(cfg, result: dict) -> dict:
    """Whether this run's JPEGs went to the hardware decoder: DALI 'mixed' decoding (dali on gpu),
    hw_decoder_load > 0, and a GPU whose nvJPEG hardware backend opens."""
    env = static_environment()
    has_engine = bool(env["gpu_name"] and HW_JPEG_GPUS.search(env["gpu_name"]))
    probe = nvjpeg_hw_probe()
    mixed = result["backend"] == "dali" and result["device"] == "gpu"
    available = probe["available"] if probe["available"] is not None else has_engine
    return {"hw_decoder_load": cfg.data.hw_decoder_load, "gpu_has_hw_jpeg_decoder": has_engine,
            "nvjpeg_hw_backend": probe, "dali_mixed_decoder": mixed,
            "hw_decoder_used": bool(mixed and cfg.data.hw_decoder_load > 0 and available)}


_NVJPEG_PROBE: dict = {}


def nvjpeg_hw_probe() -> dict:
    """Open nvJPEG's hardware backend (NVJPEG_BACKEND_HARDWARE = 3) directly: DALI reports nothing when
    it falls back to CUDA decoding, e.g. in Docker without the `video` GPU capability. `available` is
    None when it cannot be asked (no CUDA, no libnvjpeg found)."""
    if _NVJPEG_PROBE:
        return dict(_NVJPEG_PROBE)
    out = {"available": None, "status": None, "library": None}
    import torch
    if torch.cuda.is_available():
        import ctypes
        for path in _nvjpeg_candidates():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            handle = ctypes.c_void_p()
            status = lib.nvjpegCreateEx(3, None, None, 0, ctypes.byref(handle))
            if status == 0:
                lib.nvjpegDestroy(handle)
            out = {"available": status == 0, "status": int(status), "library": path}
            break
    _NVJPEG_PROBE.update(out)
    return dict(out)


def _nvjpeg_candidates() -> list[str]:
    found = []
    for base in map(Path, sys.path):
        for pattern in ("nvidia/*/lib/libnvjpeg.so*", "nvidia/nvjpeg/lib/libnvjpeg.so*",
                        "torchvision.libs/libnvjpeg*.so*"):
            found += sorted(str(p) for p in base.glob(pattern))
    return found + ["libnvjpeg.so"]


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Text table and plots
# ------------------------------------------------------------------------------------------------
def report(result: dict) -> None:
    runs = result.get("runs", [result])
    print(f"{'run':<28} {'bench':<8} {'batch':>5} {'thr':>4} {'img/s':>9} {'min':>9} {'max':>9} {'ms/img':>8}  extra")
    for r in runs:
        extra = ""
        if r["bench"] == "train":
            extra = (f"model {r['model']['images_per_sec']:.1f} img/s, train/model {r['ratio_to_model']:.2f}, "
                     f"data-wait {100 * r['data_wait_fraction']:.0f}%")
        mem = r.get("gpu_memory")
        if mem:
            extra += f"{', ' if extra else ''}GPU mem +{mem['device_used_delta_bytes'] / 2**20:.0f} MiB"
        print(f"{r['label'][:28]:<28} {r['bench']:<8} {r['batch_size']:>5} {r['num_threads']:>4} "
              f"{r['images_per_sec']:>9.1f} {r['images_per_sec_min']:>9.1f} {r['images_per_sec_max']:>9.1f} "
              f"{r['ms_per_image']:>8.2f}  {extra}")
    for name, ratio in result.get("ratios", {}).items():
        print(f"ratio {name}: {ratio:.2f}x")
    if "ops" in result:
        ops = result["ops"]
        print(f"per-op cost (ms per image, wall, {ops['threads']} threads; full recipe {ops['full_ms_per_image']:.2f}):")
        for op, ms in ops["ms_per_image"].items():
            lo, hi = ops["ms_per_image_range"][op]
            print(f"  {op:<24} {ms:7.2f} ms  [{lo:6.2f} .. {hi:6.2f}]  ({ops['thread_ms_per_image'][op]:.2f} thread-ms)")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _where(run: dict) -> str:
    env = run["env"]
    hw = env["gpu_name"] or f"{env['cpu_cores_available']}-core {env['cpu_model']}"
    return (f"{run['method']} {run['backbone']} {run['recipe']} ({'+'.join(run['views'])}), batch {run['batch_size']}"
            f"\n{hw}; median of {run['repeats']} x {run['steps_per_repeat']} batches, bars = min..max")


def _errors(runs: list[dict]) -> list[list[float]]:
    return [[r["images_per_sec"] - r["images_per_sec_min"] for r in runs],
            [r["images_per_sec_max"] - r["images_per_sec"] for r in runs]]


def plot_compare(result: dict, png: Path) -> None:
    plt, runs = _pyplot(), result["runs"]
    base = runs[-1]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(runs) + 2), 4))
    labels = [f"{r['label']}\n{r['num_threads']} threads" for r in runs]
    bars = ax.bar(labels, [r["images_per_sec"] for r in runs], yerr=_errors(runs), capsize=4, color="#4c72b0")
    for bar, r in zip(bars, runs):
        ax.annotate(f"{r['images_per_sec']:.0f}\n{r['images_per_sec'] / base['images_per_sec']:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"images/sec ({runs[0]['bench']})")
    ax.set_title(_where(runs[0]), fontsize=8)
    ax.margins(y=0.25)
    _save(fig, png)


def plot_sweep(result: dict, png: Path) -> None:
    plt, runs, key = _pyplot(), result["runs"], result["sweep"]["key"]
    values = result["sweep"]["values"]
    try:
        x = [float(v) for v in values]
    except ValueError:
        x = list(range(len(values)))  # categorical values: evenly spaced, labelled
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    a1.errorbar(x, [r["images_per_sec"] for r in runs], yerr=_errors(runs), marker="o", capsize=4)
    a1.set_ylabel("images/sec")
    a2.plot(x, [r["ms_per_image"] for r in runs], marker="o")
    a2.set_ylabel("ms per image (wall)")
    for ax in (a1, a2):
        ax.set_xlabel(key)
        ax.set_xticks(x, values)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{runs[0]['bench']} sweep, {runs[0]['label'].split('=')[0]}: " + _where(runs[0]), fontsize=8)
    _save(fig, png)


def plot_profile(result: dict, png: Path) -> None:
    plt, ops, run = _pyplot(), result["ops"], result["runs"][0]
    names = list(ops["ms_per_image"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.8))
    ms = [ops["ms_per_image"][n] for n in names]
    err = [[m - ops["ms_per_image_range"][n][0] for n, m in zip(names, ms)],
           [ops["ms_per_image_range"][n][1] - m for n, m in zip(names, ms)]]
    ax.barh(names, ms, xerr=err, capsize=3, color="#dd8452")
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per image (wall, {ops['threads']} threads); full recipe {ops['full_ms_per_image']:.2f} ms")
    ax.set_title(f"{run['backend']}-{run['device']} per-op cost by ablation\n" + _where(run), fontsize=8)
    _save(fig, png)


def _save(fig, png: Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
