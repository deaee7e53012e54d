"""Rank-0 run logging: a progress line, a JSONL metrics file and TensorBoard scalars.

The training loop hands over device tensors; they are read (one host sync) only on log steps.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("sslight")


def setup_logging(output_dir: Path | None, rank: int, filename: str = "train.log") -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None and rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / filename, delay=True))  # no empty log
    logging.basicConfig(level=level, format="[%(asctime)s %(levelname)s] %(message)s", datefmt="%m/%d %H:%M:%S",
                        handlers=handlers, force=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return float("inf")


class RunLogger:
    """Writes metrics.jsonl (every record) and TensorBoard (if enabled) on rank 0; no-op elsewhere.

    `start(step)` opens them for a run that begins at `step`: records of an earlier attempt past that
    step (a run killed after its last checkpoint) are dropped, so each step has one record."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool):
        self.output_dir, self.enabled, self.tensorboard = output_dir, enabled, tensorboard
        self.tb = None
        self.jsonl = None

    def start(self, step: int) -> None:
        if not self.enabled or self.jsonl is not None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines()
            keep = [line for line in lines if _step_of(line) <= step]
            dropped = len(lines) - len(keep)
            if dropped:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in keep))
                tmp.replace(path)
                log.info(f"metrics.jsonl: dropped {dropped} record(s) past step {step} from an earlier attempt")
        self.jsonl = open(path, "a", buffering=1)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard (see below)
                # purge_step: TensorBoard hides the earlier attempt's events from this step on.
                self.tb = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=step + 1 if step else None)
            except ImportError:
                log.warning("tensorboard is not installed: TensorBoard scalars are off (metrics.jsonl still written)")

    def write(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:  # written to without start(): append, drop nothing
            self.jsonl = open(self.output_dir / "metrics.jsonl", "a", buffering=1)
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def progress(self, epoch: int, epochs: int, it: int, iters: int, rec: dict, eta_s: float) -> None:
        if not self.enabled:
            return
        line = (f"epoch {epoch + 1}/{epochs} it {it}/{iters} | {rec['images_per_sec']:.0f} img/s | "
                f"loss {rec['loss']:.4f} | lr {rec['lr']:.3g} | data-wait {100 * rec['data_wait']:.1f}% | "
                f"ETA {_fmt_eta(eta_s)}")
        if "probe_acc" in rec:
            line += f" | probe acc {100 * rec['probe_acc']:.1f}%"
        log.info(line)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl = self.tb = None


class StepTimer:
    """Wall time per interval and the part of it spent waiting for the next batch (the data-wait meter)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start = time.perf_counter()
        self.wait = 0.0
        self.images = 0

    def waited(self, seconds: float, images: int):
        self.wait += seconds
        self.images += images

    def read(self) -> tuple[float, float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return elapsed, self.wait / elapsed, self.images / elapsed


def timed_batches(batches, timer: StepTimer, world: int):
    """Yield from `batches` (`(images or views, labels, ...)` tuples), adding the time spent waiting
    for each one to the data-wait meter; `world` processes each take a batch of that size."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        timer.waited(time.perf_counter() - t0, batch[1].shape[0] * world)
        yield batch
