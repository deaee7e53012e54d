"""Timing: one loop for every bench, its CPU time, the summary of the repeats. No torch."""
from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path


class BenchError(RuntimeError):
    """Bad bench input (missing directory, bad sweep spec); the message names it."""


def summarize(values: list[float]) -> dict:
    """Median, min and max of the per-repeat figures."""
    if not values:
        raise ValueError("no values to summarize")
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def endless(loader):
    """Batches across epoch boundaries, as long as the caller wants them."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its child processes, in seconds. process_time()
    reads CLOCK_PROCESS_CPUTIME_ID, which on Linux sums every thread of the process, so DALI's worker
    and executor threads count; DataLoader workers are child processes: the live ones are read from
    /proc, those already reaped from getrusage(RUSAGE_CHILDREN)."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + reaped.ru_utime + reaped.ru_stime + _live_children_cpu()


def _live_children_cpu() -> float:
    ticks = 0
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            pids = children.read_text().split()
        except OSError:  # a thread that ended meanwhile
            continue
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # exited (and reaped: getrusage has it now)
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": fields 3, 4, ... of proc(5)
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, and its reaped children's
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(batches, step, warmup: int, steps: int, repeats: int, sync) -> list[dict]:
    """`warmup` untimed batches, then `repeats` timed runs of `steps` batches. `step(views, labels)`
    consumes a batch (None: view sampling alone). The host time spent in next() is the data wait;
    `cpu_seconds` is the CPU time the whole process (all threads, child processes) spent meanwhile."""
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
            cpu = cpu_seconds()
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
            cpu = cpu_seconds() - cpu
            out.append({"seconds": seconds, "images": images, "images_per_sec": images / seconds,
                        "data_wait_fraction": wait / seconds, "cpu_seconds": cpu,
                        "cpu_ms_per_image": 1000.0 * cpu / images, "cpu_cores_busy": cpu / seconds})
        return out
    finally:
        batches.close()  # stops DataLoader workers now, not at some later garbage collection
