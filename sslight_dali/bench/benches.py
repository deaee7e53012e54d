"""The three benches: view sampling alone, the model step on ready tensors, training end to end.

Each returns the timed repeats and what the record adds (runs.make_record). This module imports torch,
the loaders and the trainer; `runs.run_one` loads it when a bench runs, so `sslight bench --help`
does not.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..data import build_train_loader
from ..runtime import init_distributed, prepare_process, torch_dtype, uses_channels_last
from ..train import Trainer
from .timing import endless, measure, summarize


def synchronizer(on_cuda: bool):
    """Wall time bracketed by a device-wide synchronize. CUDA events on torch's stream would miss
    DALI's work, which runs on DALI's own streams; synchronize waits for every stream."""
    if not on_cuda:
        return lambda: None
    return torch.cuda.synchronize


class GpuMemory:
    """GPU memory a run adds: device-wide (cudaMemGetInfo, so DALI's pools count as well as torch's
    cache) and torch's own peak. None on a machine without CUDA."""

    def __init__(self):
        self.on = torch.cuda.is_available()
        if self.on:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.free_before = torch.cuda.mem_get_info()[0]

    def read(self) -> dict | None:
        if not self.on:
            return None
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {"device_used_delta_bytes": int(self.free_before - free),
                "torch_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "torch_max_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "device_total_bytes": int(total)}


def _loader_layout(cfg) -> dict:
    return {"channels_last": uses_channels_last(cfg)}


def bench_pipeline(cfg, warmup: int, steps: int, repeats: int) -> dict:
    memory = GpuMemory()
    loader = build_train_loader(cfg, **_loader_layout(cfg))
    reps = measure(endless(loader), None, warmup, steps, repeats, synchronizer(loader.device == "gpu"))
    return {"repeats": reps, "backend": cfg.data.backend, "device": loader.device,
            "pipelines": getattr(loader, "pipelines", None), "extra": {"gpu_memory": memory.read()}}


class SyntheticLoader:
    """The loader interface over one batch of pre-made device tensors, yielded again and again:
    what the trainer could do if data were free."""

    def __init__(self, views, labels, num_classes: int, steps_per_epoch: int = 1000):
        self.views, self.labels = views, labels
        self.indices = torch.arange(labels.shape[0], device=labels.device)
        self.num_classes, self.steps_per_epoch = num_classes, steps_per_epoch
        self.num_samples = steps_per_epoch * labels.shape[0]
        self.device = "gpu" if labels.is_cuda else "cpu"

    @classmethod
    def random(cls, cfg, device, num_classes: int) -> "SyntheticLoader":
        """Views of the recipe's shapes, layout and dtype, as the real loader delivers them."""
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
        # As the run loop's step does: host batches are copied here; device batches pass through untouched.
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


BENCHES = {"pipeline": bench_pipeline, "model": bench_model, "train": bench_train}
