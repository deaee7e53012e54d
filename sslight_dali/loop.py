"""The run loop pre-training (`train.Trainer`) and the evaluation commands (`evaluate.common.EpochLoop`)
share: epochs of steps up to train.max_steps, log records every train.log_every steps with the
data-wait meter, the non-finite stop, periodic (train.checkpoint_every), epoch-end and final
checkpoints written by rank 0 with its errors raised on every rank, stop signals agreed on by every
rank (exit 75 after a checkpoint at that step), and a lost peer reported in one line.

A subclass sets the attributes listed in `RunLoop` and fills in the hooks: one step, the fields of
its log records, its checkpoint state and how rank 0 writes it, and what happens at an epoch's end.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .data.sources import DataError
from .logger import RunLogger, StepTimer, timed_batches
from .run_policy import gather_per_rank, stop_if_nonfinite

log = logging.getLogger("sslight")

# Exit status of a run stopped by SIGTERM/SIGINT/SIGUSR1 after writing its checkpoint: EX_TEMPFAIL,
# "try again later". A job script requeues on it (see the README's SLURM example).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Stopped by a signal after writing a checkpoint at the current step; the command exits 75."""


class PeerLostError(RuntimeError):
    """Another process of the run died or stopped answering (train.dist_timeout_s)."""


class StopSignals:
    """SIGTERM, SIGINT, SIGUSR1: the first asks the loop to stop after the current step and write a
    checkpoint; a second one exits at once (the last complete checkpoint stays the newest)."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"sslight: second signal ({name}): exiting now without writing a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = name
        log.warning(f"{name} received: finishing this step, then writing a checkpoint and stopping "
                    "(a second signal exits at once)")


# What gloo and NCCL say when another rank died or stopped answering: gloo's socket errors and
# send/recv timeouts ("Connection closed by peer" is what a rank sees when its peer exits), NCCL's
# remote error and its watchdog's collective timeout. Other NCCL errors (invalid usage, unhandled CUDA
# or system error, internal error) and timeouts outside a collective are bugs to see in full.
PEER_LOST = re.compile(r"connection closed by peer|connection reset by peer|broken pipe"
                       r"|timed out waiting \d+ ?ms for (?:recv|send) operation"
                       r"|remote process exited or there was a network error"
                       r"|watchdog caught collective operation timeout", re.IGNORECASE)


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or stopped answering. The store's errors
    (DistNetworkError, DistStoreError) mean the rendezvous host is gone; a backend error is a lost peer
    only when it says so, and it must come from torch.distributed (a Dist* type, or gloo's plain
    RuntimeError, which names its gloo source file)."""
    if isinstance(e, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    text = str(e)
    from_dist = isinstance(e, dist.DistError) or "gloo" in text.lower() or "nccl" in text.lower()
    return from_dist and PEER_LOST.search(text) is not None


def write_on_rank0(write, rank: int, world: int) -> None:
    """Rank 0 runs `write()`; a CheckpointError it raises is raised on every rank at once (a collective:
    every rank calls this), so that no rank is left waiting train.dist_timeout_s in the next one."""
    error = None
    if rank == 0:
        try:
            write()
        except ckpt.CheckpointError as e:
            error = str(e)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ckpt.CheckpointError(error)


class RunLoop:
    """Epochs of `loader.epoch(e)` batches from `step`/`epoch` to `epochs` (or train.max_steps).

    A subclass sets cfg, loader, rank, world, device, output_dir, epochs, step, epoch and calls
    `init_loop()`; it implements `run_step`, `record`, `state_dict`, `write_checkpoint` and may
    override `start_epoch`, `end_epoch` (before the epoch counter moves on) and `after_epoch_checkpoint`.
    """
    PER_RANK = ("loader", "rng")  # checkpoint entries every rank writes its own of
    # The non-finite stop's message, formatted with the step and epoch.
    NONFINITE = "non-finite loss at or before step {step}: stopping without writing a checkpoint"

    def init_loop(self) -> None:
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.signals = StopSignals()
        self._stop_agreed = False
        self.logger = RunLogger(self.output_dir, enabled=self.rank == 0, tensorboard=self.cfg.train.tensorboard)

    # -- hooks ------------------------------------------------------------------------------------
    def run_step(self, batch) -> tuple[torch.Tensor, dict]:
        """One optimisation step on a loader batch (moved to the device here); adds a non-finite
        loss to self.nonfinite and advances self.step. Returns (detached loss, metrics)."""
        raise NotImplementedError

    def record(self, metrics: dict) -> dict:
        """A log record's fields between "loss" and "images_per_sec"."""
        raise NotImplementedError

    def write_checkpoint(self, state: dict, tag_epoch: bool) -> None:
        """Rank 0 writes `state`; a write failure raises CheckpointError."""
        raise NotImplementedError

    def start_epoch(self) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def after_epoch_checkpoint(self) -> dict:
        return {}

    # -- the loop ---------------------------------------------------------------------------------
    def total_steps(self) -> int:
        total = self.epochs * self.loader.steps_per_epoch
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def fit(self) -> dict:
        """Run to the end; returns the last log record (with the last epoch-end additions)."""
        total = self.total_steps()
        self.start_step, self.run_start = self.step, time.perf_counter()
        self.logger.start(self.step)
        try:
            with self.signals:
                return self._loop(total, StepTimer())
        except (RuntimeError, ValueError) as e:
            if self.world > 1 and is_peer_failure(e):
                raise PeerLostError(f"rank {self.rank}: lost contact with another process of this run at step "
                                    f"{self.step} ({ckpt.first_line(e)}); the newest checkpoint in "
                                    f"{self.output_dir} is intact: restart the job with resume=auto") from None
            raise
        finally:
            self.logger.close()

    def _loop(self, total: int, timer: StepTimer) -> dict:
        cfg, spe, last = self.cfg, self.loader.steps_per_epoch, {}
        while self.step < total:
            self.start_epoch()
            epoch_end = (self.epoch + 1) * spe
            with self._on_data_error():
                for batch in timed_batches(self.loader.epoch(self.epoch), timer, self.world):
                    loss, metrics = self.run_step(batch)
                    ckpt.fault_point("step")
                    if self.step % cfg.train.log_every == 0 or self.step == total:
                        last = self._log(loss, metrics, timer, total)
                    if self._stop_requested(logged=self.step % cfg.train.log_every == 0):
                        if self.step == epoch_end:
                            break  # the epoch-end save below is the stop checkpoint
                        self.save()
                        self._preempted()
                    if (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0
                            and self.step != epoch_end):  # the epoch-end save below covers that step
                        self.save()
                    if self.step >= total:
                        break
            if self.step < epoch_end and self.step < total:
                raise RuntimeError(f"the loader ended epoch {self.epoch} after {self.step - self.epoch * spe} "
                                   f"batches; expected {spe}")
            if self.step < epoch_end:  # stopped by train.max_steps inside the epoch
                self.save()
                break
            self.end_epoch()
            self.epoch += 1
            self.save(tag_epoch=True)
            if self._stop_requested(logged=False, again=True):
                self._preempted()
            last.update(self.after_epoch_checkpoint())
            timer.reset()  # the epoch-end save and evaluation are not training throughput
        return last

    @contextmanager
    def _on_data_error(self):
        """A file that fails to decode mid-run stops the run with the loader's one line, after a
        checkpoint at the last completed step (one process only: with several, the others are inside
        a collective and stop on train.dist_timeout_s instead)."""
        try:
            yield
        except DataError as e:
            if self.world > 1:
                raise
            try:
                self.save()
                saved = f"checkpoint written at step {self.step}"
            except Exception as e2:  # e.g. a dead DALI pipeline cannot report its position
                saved = f"no checkpoint at step {self.step} ({ckpt.first_line(e2)}); the newest one is kept"
            raise DataError(f"{e} [{saved}]") from None

    def _stop_requested(self, logged: bool, again: bool = False) -> bool:
        """Has a stop signal arrived? With several processes all ranks must stop at the same step, so
        they agree by an all-reduce, done on log steps only (a host sync there already): a signal
        stops the run at the next log step (train.log_every). `again`: the answer already agreed on."""
        if self.world == 1:
            return self.signals.received is not None
        if again:
            return self._stop_agreed
        if not logged:
            return False
        flag = torch.tensor([int(self.signals.received is not None)], dtype=torch.int32,
                            device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop_agreed = bool(flag.item())
        return self._stop_agreed

    def _preempted(self):
        raise Preempted(f"stopped by {self.signals.received or 'a signal to another rank'} at step {self.step} "
                        f"(epoch {self.epoch}) after writing a checkpoint in {self.output_dir}; "
                        "continue with resume=auto")

    def _log(self, loss: torch.Tensor, metrics: dict, timer: StepTimer, total: int) -> dict:
        self.check_finite()
        _, wait_frac, ips = timer.read()
        rec = {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": float(loss), **self.record(metrics),
               "images_per_sec": ips, "data_wait": wait_frac, "time": time.time()}
        eta = (time.perf_counter() - self.run_start) / max(self.step - self.start_step, 1) * (total - self.step)
        spe = self.loader.steps_per_epoch
        self.logger.write(rec, self.step)
        self.logger.progress(self.epoch, self.epochs, self.step - self.epoch * spe, spe, rec, eta)
        timer.reset()
        return rec

    # -- checkpoints ------------------------------------------------------------------------------
    def check_finite(self) -> None:
        stop_if_nonfinite(self.nonfinite, self.world, self.NONFINITE.format(step=self.step, epoch=self.epoch))

    def save(self, tag_epoch: bool = False) -> None:
        self.check_finite()  # never write a NaN checkpoint
        # Every rank takes part: the PER_RANK entries are gathered to rank 0.
        state = gather_per_rank(self.state_dict(), self.PER_RANK, self.world)
        write_on_rank0(lambda: self.write_checkpoint(state, tag_epoch), self.rank, self.world)

