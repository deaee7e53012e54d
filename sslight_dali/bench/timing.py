"""Timing: one loop for every bench, and the GPU memory a run adds. No torch at import."""
from __future__ import annotations

import statistics
import time


class BenchError(RuntimeError):
    """Bad bench input (missing directory, bad sweep spec); the message names it."""


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


