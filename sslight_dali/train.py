"""Pre-training for DINO, SwAV and MoCo-v2: `train()`, the run step by step, and its `Trainer`.

Launch with `sslight train CONFIG [overrides]` (one process) or `torchrun ... -m sslight_dali.cli train`.
The method module (sslight_dali.methods) owns head, loss and update; the Trainer owns precision, DDP,
schedules (plain arrays indexed by the global step), one step, the checkpoint state and exact resume,
and kNN monitoring. The loop around the steps (log cadence, stop signals, checkpoints, max_steps, the
non-finite stop) is loop.py's, shared with the evaluation commands. Process set-up is in runtime.py;
what is decided around the loop (run directory, which checkpoint to resume, synthetic data) in run_policy.py.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import Config, dump_config, save_config, to_dict
from .data import build_train_loader
from .knn import knn_evaluate
from .logger import setup_logging
from .loop import RunLoop  # the run loop shared with the evaluation commands
from .methods import build_method, build_schedules
from .methods.common import MultiCropNet
from .models import sync_batchnorm
from .optim import OPTIMIZER_SCHEDULES, build_optimizer, clip_gradients_, global_batch_size
# What decides around the loop (run directory, resume, synthetic data) is in run_policy.py; process
# and device set-up in runtime.py (both shared with bench, evaluation and the demo).
from .run_policy import (check_eval_split, check_resumable, claim_output_dir, own_rank_entry, prepare_data_root,
                         resume_point)
from .runtime import (autocast, autocast_dtype, init_distributed, is_convnet, prepare_process, resolve_precision,
                      shutdown_distributed, torch_dtype, uses_channels_last)

log = logging.getLogger("sslight")


def compile_networks(method: nn.Module) -> None:
    """train.compile: torch.compile each backbone + head (`MultiCropNet`) in place: one graph per network
    and grad mode, fixed shapes. In place keeps the state_dict keys (no `_orig_mod.` prefix), so a
    checkpoint moves freely between compiled and eager runs. The loss code around the networks stays
    eager: it reads per-epoch Python values (DINO's teacher temperature) that would recompile a graph
    holding it at every new value, and past torch's recompile limit (8) that code runs eager anyway."""
    # One trainer at a time per process (a bench sweep builds several in turn): start from empty caches, so
    # that earlier trainers' graphs do not count against that limit, which is per function, not per module.
    torch._dynamo.reset()
    for m in method.modules():
        if isinstance(m, MultiCropNet):
            m.compile(dynamic=False)


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class Trainer(RunLoop):
    """Model, optimizer and schedules of a pre-training run, on the shared run loop (loop.py).
    `loader` follows sslight_dali.data's interface: `steps_per_epoch`, `num_classes`, `epoch(e)`
    yielding (views, labels, indices), `state_dict()`."""
    PER_RANK = ("loader", "rng", "method_rank")
    NONFINITE = ("non-finite loss at or before step {step} (epoch {epoch}); stopping without writing a checkpoint. "
                 "Lower optim.base_lr, try train.precision=fp32, or check the data.")

    def __init__(self, cfg: Config, loader, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 output_dir: Path | None = None):
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
        self.epochs = cfg.train.epochs
        self.step = 0          # global step: index into the schedules
        self.epoch = 0
        self.init_loop()

    # -- one optimisation step --------------------------------------------------------------------
    def train_step(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        s = min(self.step, len(self.schedules["lr"]) - 1)
        for g in self.optimizer.param_groups:
            g["lr"] = float(self.schedules["lr"][s])
            g["weight_decay"] = float(self.schedules["wd"][s]) * g.get("wd_factor", 1.0)
        with autocast(self.device, autocast_dtype(self.precision)):
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

    # -- the run loop's hooks (loop.RunLoop) ------------------------------------------------------
    def start_epoch(self) -> None:
        self.method.on_epoch_start(self.epoch)

    def run_step(self, batch) -> tuple[torch.Tensor, dict]:
        views, labels, _ = batch
        views = [v.to(self.device, non_blocking=True) for v in views]
        labels = labels.to(self.device, non_blocking=True)
        t0 = time.perf_counter()
        loss, metrics = self.train_step(views, labels)
        if self.step == self.start_step + 1 and self.cfg.train.compile:
            self._log_startup(loss, t0)
        return loss, metrics

    def _log_startup(self, loss: torch.Tensor, t0: float) -> None:
        """train.compile: the first step compiles the networks; its wall time is the start-up cost,
        logged once (float(loss): one host sync, so that the GPU's work is counted)."""
        float(loss)
        log.info(f"train.compile: the first step took {time.perf_counter() - t0:.1f} s (torch.compile builds "
                 "the networks' kernels there; later steps reuse them)")

    def record(self, metrics: dict) -> dict:
        s = self.step - 1
        return {**{k: float(v) for k, v in metrics.items()},
                **{k: float(v[s]) for k, v in self.schedules.items()}}  # lr, wd and the method's

    def after_epoch_checkpoint(self) -> dict:
        if self.cfg.train.knn_every and self.epoch % self.cfg.train.knn_every == 0:
            return self.evaluate()
        return {}

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
            "ema_after_step": True,  # momentum twins updated after the step (MoCo's were in the next forward)
        }

    def write_checkpoint(self, state: dict, tag_epoch: bool) -> None:
        keep = self.cfg.train.keep_every_epochs
        tag = self.epoch if tag_epoch and keep and self.epoch % keep == 0 else None
        ckpt.save_checkpoint(state, self.output_dir, self.step, tag, self.cfg.train.keep_last)

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        if "method_rank" in state:  # older checkpoints: every rank resumes rank 0's buffers from "model"
            self.method.load_rank_state(self._own(state["method_rank"]))
        self.loader.load_state_dict(self._own(state["loader"]))
        ckpt.set_rng_state(self._own(state["rng"]))
        self.method.after_resume(state)

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
def train(cfg: Config) -> dict:
    """A pre-training run, step by step: the process, the run directory and the checkpoint to resume,
    the data, the method with its optimizer and schedules, the resume, the loop, the result."""
    # The process: rank, device, precision, memory layout.
    rank, world, device = init_distributed(cfg)
    precision, channels_last = resolve_precision(cfg, device), uses_channels_last(cfg)

    # The run directory and the checkpoint to resume (rank 0 decides; every rank gets its answer or error).
    output_dir = Path(cfg.train.output_dir)
    moved = claim_output_dir(cfg, output_dir, rank, world)
    setup_logging(output_dir, rank)
    if moved is not None:
        log.warning(f"train.overwrite=true: the previous run in {output_dir} was moved to {moved}")
    resume_from, state = resume_point(cfg, output_dir, rank, world)
    if state is not None:
        check_resumable(state["config"], cfg, resume_from)

    # The data: the embedded set when data.root is empty, the kNN split check, the seeds, the loader.
    prepare_data_root(cfg, rank)
    check_eval_split(cfg)
    prepare_process(cfg.train.seed + rank, device)
    loader = build_train_loader(cfg, rank=rank, world_size=world, channels_last=channels_last,
                                dtype=torch_dtype(cfg.data.dtype))
    if loader.num_classes == 0 and cfg.train.joint_linear_probe and not cfg.train.num_classes:
        log.info("the train split has no labels: the joint linear probe is off")

    # The method, its optimizer and schedules; the resume.
    trainer = Trainer(cfg, loader, rank, world, device, output_dir)
    if state is not None:
        trainer.load_state_dict(state)
        log.info(f"resumed from {resume_from} at step {trainer.step} (epoch {trainer.epoch})")
    if rank == 0:
        save_config(cfg, output_dir / "config.yaml")
        log.info(f"{cfg.method} / {cfg.model.backbone} / recipe {cfg.recipe.name} on {world} x {device} "
                 f"({precision}{', channels-last' if channels_last else ''}); "
                 f"{loader.num_samples} images, {loader.steps_per_epoch} steps/epoch, "
                 f"global batch {cfg.train.batch_size * world}, data: {cfg.data.backend} on {loader.device}")
        log.debug(dump_config(cfg))

    # The loop, then the result.
    try:
        result = trainer.fit()
    finally:
        shutdown_distributed()
    # The last log record's "epoch" is the 0-based epoch it was logged in; report completed ones only.
    result = {k: v for k, v in result.items() if k not in ("step", "epoch")}
    result.update({"output_dir": str(output_dir), "steps": trainer.step, "epochs": trainer.epoch})
    return result
