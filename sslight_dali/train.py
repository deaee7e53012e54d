"""The training loop shared by DINO, SwAV and MoCo-v2: one step, one epoch, checkpoints, kNN.

Launch with `sslight train CONFIG [overrides]` (one process) or `torchrun ... -m sslight_dali.cli train`.
The method module (sslight_dali.methods) owns head, loss and update; this file owns the mechanics:
precision, DDP, schedules (plain arrays indexed by the global step), logging without per-step host
syncs, stop signals, atomic checkpoints and exact resume. Process set-up is in runtime.py; what is
decided around the loop (run directory, which checkpoint to resume, synthetic data) in run_policy.py.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint as ckpt
from .config import Config, dump_config, save_config, to_dict
from .knn import knn_evaluate
from .logger import RunLogger, StepTimer, setup_logging, timed_batches
from .models import sync_batchnorm
from .optim import OPTIMIZER_SCHEDULES, clip_gradients_
# What decides around the loop (run directory, resume, synthetic data) is in run_policy.py; process
# and device set-up in runtime.py (both shared with bench, evaluation and the demo).
from .run_policy import (check_eval_split, check_resumable, claim_output_dir, gather_per_rank, own_rank_entry,
                         prepare_data_root, resume_point, stop_if_nonfinite)
from .runtime import (autocast_dtype, init_distributed, is_convnet, prepare_process, resolve_precision,
                      shutdown_distributed, torch_dtype, uses_channels_last)

log = logging.getLogger("sslight")


# Exit status of a run stopped by SIGTERM/SIGINT/SIGUSR1 after writing its checkpoint: EX_TEMPFAIL,
# "try again later". A job script requeues on it (see the README's SLURM example).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Stopped by a signal after writing a checkpoint at the current step; `sslight train` exits 75."""


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


def compile_networks(method: nn.Module) -> None:
    """train.compile: torch.compile each backbone + head (`MultiCropNet`) in place: one graph per network
    and grad mode, fixed shapes. In place keeps the state_dict keys (no `_orig_mod.` prefix), so a
    checkpoint moves freely between compiled and eager runs. The loss code around the networks stays
    eager: it reads per-epoch Python values (DINO's teacher temperature) that would recompile a graph
    holding it at every new value, and past torch's recompile limit (8) that code runs eager anyway."""
    from .methods.common import MultiCropNet
    # One trainer at a time per process (a bench sweep builds several in turn): start from empty caches, so
    # that earlier trainers' graphs do not count against that limit, which is per function, not per module.
    torch._dynamo.reset()
    for m in method.modules():
        if isinstance(m, MultiCropNet):
            m.compile(dynamic=False)


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Owns model, optimizer, schedules and the loop. `loader` follows sslight_dali.data's interface:
    `steps_per_epoch`, `num_classes`, `epoch(e)` yielding (views, labels, indices), `state_dict()`."""

    def __init__(self, cfg: Config, loader, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 output_dir: Path | None = None):
        from .methods import build_method, build_schedules
        from .optim import build_optimizer, global_batch_size

        self.cfg, self.loader, self.rank, self.world = cfg, loader, rank, world
        self.device = device or torch.device("cpu")
        self.output_dir = Path(output_dir or cfg.train.output_dir)
        self.precision = resolve_precision(cfg, self.device)
        self.channels_last = uses_channels_last(cfg)
        self.num_classes = cfg.train.num_classes or loader.num_classes

        self.method = build_method(cfg, self.num_classes).to(self.device)
        if world > 1 and cfg.model.sync_bn and is_convnet(cfg) and self.device.type == "cuda":
            # BN statistics over the global batch, as the reference (one BN pass per crop-size group).
            # PyTorch's SyncBatchNorm is CUDA-only: gloo/CPU runs keep per-process BN statistics.
            self.method = sync_batchnorm(self.method)
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            compile_networks(self.method)
        self.model = self.method
        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # broadcast_buffers=False: per-rank buffers (SwAV queue) must not be overwritten by rank 0's;
            # shared ones (DINO center, MoCo queue) are kept equal by all-reduce / all-gather.
            self.model = nn.parallel.DistributedDataParallel(self.method, device_ids=ids, broadcast_buffers=False)

        self.optimizer = build_optimizer(cfg, self.method)
        self.schedules = build_schedules(cfg, loader.steps_per_epoch, global_batch_size(cfg, world))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0          # global step: index into the schedules
        self.epoch = 0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.signals = StopSignals()
        self._stop_agreed = False
        self.logger = RunLogger(self.output_dir, enabled=rank == 0, tensorboard=cfg.train.tensorboard)

    # -- one optimisation step --------------------------------------------------------------------
    def autocast(self):
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def train_step(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        s = min(self.step, len(self.schedules["lr"]) - 1)
        for g in self.optimizer.param_groups:
            g["lr"] = float(self.schedules["lr"][s])
            g["weight_decay"] = float(self.schedules["wd"][s]) * g.get("wd_factor", 1.0)
        with self.autocast():
            loss, metrics = self.model(views, labels, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients_(self.method.parameters(), self.cfg.optim.clip_grad)
        self.method.after_backward(self.epoch)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        own = {k: float(v[s]) for k, v in self.schedules.items() if k not in OPTIMIZER_SCHEDULES}
        self.method.after_step(s, **own)  # the method's schedules (DINO: teacher momentum)
        self.nonfinite |= ~torch.isfinite(loss.detach())
        self.step += 1
        return loss.detach(), metrics

    def check_finite(self) -> None:
        stop_if_nonfinite(self.nonfinite, self.world,
                          f"non-finite loss at or before step {self.step} (epoch {self.epoch}); stopping without "
                          "writing a checkpoint. Lower optim.base_lr, try train.precision=fp32, or check the data.")

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, spe = self.cfg, self.loader.steps_per_epoch
        total_steps = cfg.train.epochs * spe
        if cfg.train.max_steps:
            total_steps = min(total_steps, cfg.train.max_steps)
        timer, last = StepTimer(), {}
        run_start, start_step = time.perf_counter(), self.step
        self.logger.start(self.step)
        try:
            with self.signals:
                last = self._loop(total_steps, timer, last, run_start, start_step)
        finally:
            self.logger.close()
        return last

    def _loop(self, total_steps, timer, last, run_start, start_step) -> dict:
        cfg, spe = self.cfg, self.loader.steps_per_epoch
        while self.step < total_steps:
            self.method.on_epoch_start(self.epoch)
            epoch_end = (self.epoch + 1) * spe
            with self._on_data_error():
                for views, labels, _ in timed_batches(self.loader.epoch(self.epoch), timer, self.world):
                    views = [v.to(self.device, non_blocking=True) for v in views]
                    labels = labels.to(self.device, non_blocking=True)
                    t0 = time.perf_counter()
                    loss, metrics = self.train_step(views, labels)
                    if self.step == start_step + 1 and cfg.train.compile:
                        self._log_startup(loss, t0)
                    ckpt.fault_point("step")
                    if self.step % cfg.train.log_every == 0 or self.step == total_steps:
                        last = self._log(loss, metrics, timer, total_steps, run_start, start_step)
                    if self._stop_requested(logged=self.step % cfg.train.log_every == 0):
                        if self.step == epoch_end:
                            break  # the epoch-end save below is the stop checkpoint
                        self.save()
                        self._preempted()
                    if (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0
                            and self.step != epoch_end):  # the epoch-end save below covers that step
                        self.save()
                    if self.step >= total_steps:
                        break
            if self.step < epoch_end and self.step < total_steps:
                raise RuntimeError(f"the loader ended epoch {self.epoch} after {self.step - self.epoch * spe} "
                                   f"batches; expected {spe}")
            if self.step < epoch_end:  # stopped by train.max_steps inside the epoch
                self.save()
                break
            self.epoch += 1
            self.save(tag_epoch=True)
            if self._stop_requested(logged=False, again=True):
                self._preempted()
            if cfg.train.knn_every and self.epoch % cfg.train.knn_every == 0:
                last.update(self.evaluate())
            timer.reset()  # the epoch-end save and kNN are not training throughput
        return last

    def _log_startup(self, loss: torch.Tensor, t0: float) -> None:
        """train.compile: the first step compiles the networks; its wall time is the start-up cost,
        logged once (float(loss): one host sync, so that the GPU's work is counted)."""
        float(loss)
        log.info(f"train.compile: the first step took {time.perf_counter() - t0:.1f} s (torch.compile builds "
                 "the networks' kernels there; later steps reuse them)")

    @contextmanager
    def _on_data_error(self):
        """A file that fails to decode mid-run stops the run with the loader's one line, after a
        checkpoint at the last completed step (one process only: with several, the others are inside
        a collective and stop on train.dist_timeout_s instead)."""
        from .data.sources import DataError  # here: the data package loads DALI
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

    def _log(self, loss, metrics, timer: StepTimer, total_steps: int, run_start: float, start_step: int) -> dict:
        self.check_finite()
        elapsed, wait_frac, ips = timer.read()
        s = self.step - 1
        rec = {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": float(loss),
               **{k: float(v) for k, v in metrics.items()},
               **{k: float(v[s]) for k, v in self.schedules.items()},  # lr, wd and the method's
               "images_per_sec": ips, "data_wait": wait_frac, "time": time.time()}
        done = self.step - start_step
        eta = (time.perf_counter() - run_start) / max(done, 1) * (total_steps - self.step)
        self.logger.write(rec, self.step)
        self.logger.progress(self.epoch, self.cfg.train.epochs, self.step - self.epoch * self.loader.steps_per_epoch,
                             self.loader.steps_per_epoch, rec, eta)
        timer.reset()
        return rec

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "config": to_dict(self.cfg),
            "rng": ckpt.rng_state(),
            "loader": self.loader.state_dict(),
            "method_rank": self.method.rank_state(),  # per-rank buffers (SwAV queue); empty for the others
        }

    def save(self, tag_epoch: bool = False) -> None:
        self.check_finite()  # never write a NaN checkpoint
        # Every rank takes part: the loader, RNG and method_rank entries are per rank.
        state = gather_per_rank(self.state_dict(), ("loader", "rng", "method_rank"), self.world)
        error = None
        if self.rank == 0:
            keep = self.cfg.train.keep_every_epochs
            tag = self.epoch if tag_epoch and keep and self.epoch % keep == 0 else None
            try:
                ckpt.save_checkpoint(state, self.output_dir, self.step, tag, self.cfg.train.keep_last)
            except ckpt.CheckpointError as e:
                error = str(e)
        if self.world > 1:  # every rank stops when rank 0 cannot write, or the others would hang
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise ckpt.CheckpointError(error)

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        if "method_rank" in state:  # older checkpoints: every rank resumes rank 0's buffers from "model"
            self.method.load_rank_state(self._own(state["method_rank"]))
        self.loader.load_state_dict(self._own(state["loader"]))
        ckpt.set_rng_state(self._own(state["rng"]))

    def _own(self, entry: dict) -> dict:
        return own_rank_entry(entry, self.rank, self.world)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """kNN top-1/top-5 of the student backbone (cfg.eval.knn_mode), logged and returned."""
        cfg = self.cfg
        res, vf, vl = knn_evaluate(cfg, self.method.backbone, self.device, autocast_dtype(self.precision),
                                   self.rank, self.world, self.channels_last)
        rec = {"kind": "eval", "step": self.step, "epoch": self.epoch, "knn_top1": res["top1"], "knn_top5": res["top5"]}
        if self.method.probe is not None:
            # The joint probe on val center crops: the reference's "Linear probe" monitor
            # (src/sslight/engine/trainer.py:304-316).
            with torch.no_grad():
                pred = self.method.probe(vf.to(self.method.probe.weight.dtype)).argmax(1)
            rec["probe_top1"] = 100.0 * (pred == vl).float().mean().item()
        self.logger.write(rec, self.step)
        probe = f", joint linear probe top-1 {rec['probe_top1']:.2f}%" if "probe_top1" in rec else ""
        log.info(f"epoch {self.epoch}: kNN ({cfg.eval.knn_mode}, k={res['k']}) top-1 {res['top1']:.2f}% "
                 f"top-5 {res['top5']:.2f}% on {res['n']} images{probe}")
        return {k: v for k, v in rec.items() if k not in ("kind", "step", "epoch")}


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
# What gloo and NCCL say when another rank died or stopped answering: gloo's socket errors and
# send/recv timeouts ("Connection closed by peer" is what a rank sees when its peer exits), NCCL's
# remote error and its watchdog's collective timeout. Other NCCL errors (invalid usage, unhandled CUDA
# or system error, internal error) and timeouts outside a collective are bugs to see in full.
PEER_LOST = re.compile(r"connection closed by peer|connection reset by peer|broken pipe"
                       r"|timed out waiting \d+ ?ms for (?:recv|send) operation"
                       r"|remote process exited or there was a network error"
                       r"|watchdog caught collective operation timeout", re.IGNORECASE)


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or stopped answering. The store's errors
    (DistNetworkError, DistStoreError) mean the rendezvous host is gone; a backend error is a lost peer
    only when it says so, and it must come from torch.distributed (a Dist* type, or gloo's plain
    RuntimeError, which names its gloo source file)."""
    if isinstance(e, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    text = str(e)
    from_dist = isinstance(e, dist.DistError) or "gloo" in text.lower() or "nccl" in text.lower()
    return from_dist and PEER_LOST.search(text) is not None


def train(cfg: Config) -> dict:
    from .data import build_train_loader
    rank, world, device = init_distributed(cfg)
    output_dir = Path(cfg.train.output_dir)
    moved = claim_output_dir(cfg, output_dir, rank, world)
    setup_logging(output_dir, rank)
    if moved is not None:
        log.warning(f"train.overwrite=true: the previous run in {output_dir} was moved to {moved}")
    resume_from, state = resume_point(cfg, output_dir, rank, world)
    if state is not None:
        check_resumable(state["config"], cfg, resume_from)
    prepare_data_root(cfg, rank)
    check_eval_split(cfg)
    prepare_process(cfg.train.seed + rank, device)
    precision = resolve_precision(cfg, device)
    loader = build_train_loader(cfg, rank=rank, world_size=world,
                                channels_last=uses_channels_last(cfg),
                                dtype=torch_dtype(cfg.data.dtype))
    if loader.num_classes == 0 and cfg.train.joint_linear_probe and not cfg.train.num_classes:
        log.info("the train split has no labels: the joint linear probe is off")
    trainer = Trainer(cfg, loader, rank, world, device, output_dir)
    if state is not None:
        trainer.load_state_dict(state)
        log.info(f"resumed from {resume_from} at step {trainer.step} (epoch {trainer.epoch})")
    if rank == 0:
        save_config(cfg, output_dir / "config.yaml")
        log.info(f"{cfg.method} / {cfg.model.backbone} / recipe {cfg.recipe.name} on {world} x {device} "
                 f"({precision}{', channels-last' if trainer.channels_last else ''}); "
                 f"{loader.num_samples} images, {loader.steps_per_epoch} steps/epoch, "
                 f"global batch {cfg.train.batch_size * world}, data: {cfg.data.backend} on {loader.device}")
        log.debug(dump_config(cfg))
    try:
        result = trainer.fit()
    except (RuntimeError, ValueError) as e:
        if world > 1 and _is_peer_failure(e):
            raise PeerLostError(f"rank {rank}: lost contact with another process of this run at step "
                                f"{trainer.step} ({ckpt.first_line(e)}); the newest checkpoint in {output_dir} "
                                "is intact: restart the job with resume=auto") from None
        raise
    finally:
        shutdown_distributed()
    # The last log record's "epoch" is the 0-based epoch it was logged in; report completed ones only.
    result = {k: v for k, v in result.items() if k not in ("step", "epoch")}
    result.update({"output_dir": str(output_dir), "steps": trainer.step, "epochs": trainer.epoch})
    return result
