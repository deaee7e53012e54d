"""Parameter groups, LARS, AdamW and the per-iteration schedules, as the reference (saic-fi/SSLight
src/sslight/utils/param_utils.py:95-125, optimizer.py, scheduler.py:4-17, engine/trainer.py:112-145).

Every iteration the trainer sets, for each group g:
    g["lr"] = sched["lr"][step];  g["weight_decay"] = sched["wd"][step] * g["wd_factor"]
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

# name -> (wd_factor, lars_exclude). Depthwise weights skip WD but keep the trust ratio (the reference's
# WD_FACTOR_FOR_DW 0.0 and LARS_EXCLUDE_DW False, src/config/defaults.py:250,254).
GROUPS = {
    "regularized": (1.0, False),
    "regularized_dw": (0.0, False),
    "not_regularized": (0.0, True),
}


def group_of(p: torch.Tensor) -> str:
    if p.ndim < 2:
        return "not_regularized"  # biases, BN/LN affine
    if p.ndim == 4 and p.shape[1] == 1:
        return "regularized_dw"  # depthwise conv (MobileNetV2)
    return "regularized"  # includes ViT pos_embed/cls_token and DINO's weight_g (ndim 2)


def param_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters only (teacher / key encoder / frozen weight_g are excluded). A method
    may place parameters itself (`SSLMethod.param_group`); the rule above is the default."""
    rule = getattr(model, "param_group", lambda name, p: group_of(p))
    params: dict[str, list] = {name: [] for name in GROUPS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[rule(name, p)].append(p)
    return [dict(name=name, params=ps, wd_factor=GROUPS[name][0], lars_exclude=GROUPS[name][1])
            for name, ps in params.items() if ps]


class LARS(torch.optim.Optimizer):
    """LARS as in the reference (DINO/Barlow Twins variant): dp = grad + wd * p; unless the group
    is `lars_exclude`, dp *= eta * |p| / |dp| when both norms are > 0; mu = momentum * mu + dp;
    p -= lr * mu. No epsilon, no Nesterov. Multi-tensor ops, no host syncs."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, lars_exclude: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            dps = torch._foreach_add([p.grad for p in params], params, alpha=g["weight_decay"])
            if not g["lars_exclude"]:
                _trust_ratio_(dps, params, g["eta"])
            mus = [self._momentum_buffer(p) for p in params]
            torch._foreach_mul_(mus, g["momentum"])
            torch._foreach_add_(mus, dps)
            torch._foreach_add_(params, mus, alpha=-g["lr"])
        return loss

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["mu"]


def _trust_ratio_(dps: tuple[torch.Tensor, ...], params: list[torch.Tensor], eta: float) -> None:
    p_norm = torch.stack(torch._foreach_norm(params))
    d_norm = torch.stack(torch._foreach_norm(dps))
    ratio = torch.where((p_norm > 0) & (d_norm > 0), eta * p_norm / d_norm, torch.ones_like(p_norm))
    torch._foreach_mul_(dps, list(ratio.unbind(0)))


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model)
    for g in groups:
        g["weight_decay"] = o.weight_decay * g["wd_factor"]  # overwritten every step by the trainer
    if o.name == "lars":
        return LARS(groups, lr=0.0, momentum=o.momentum, eta=o.lars_eta)
    # torch's fused AdamW is the same update as the reference's torch.optim.AdamW in one kernel.
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), eps=o.eps,
                             **({"fused": True} if on_cuda else {}))


@torch.no_grad()
def clip_gradients_(params, max_norm: float) -> None:
    """DINO-style clipping: each parameter's grad norm separately (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coef.unbind(0)))


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------
def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: float = 0, start_warmup: float = 0.0) -> np.ndarray:
    """Per-iteration values: linspace(start_warmup, base) over the warmup (inclusive of base),
    then a half cosine from base toward final over arange(T)/T (the last value stays above final)."""
    warmup_iters = int(warmup_epochs * iters_per_epoch)
    warmup = np.linspace(start_warmup, base, warmup_iters)
    t = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / len(t)))
    return np.concatenate((warmup, cosine))


def global_batch_size(cfg, world_size: int) -> int:
    """The batch the LR is scaled for: reference_world_size (if set) replaces the real one."""
    ranks = cfg.train.reference_world_size if cfg.train.reference_world_size > 0 else world_size
    return cfg.train.batch_size * ranks


OPTIMIZER_SCHEDULES = ("lr", "wd")


def optimizer_schedules(cfg, iters_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """lr (peak = base_lr * global_batch / 256; min_lr and start_warmup_lr absolute) and wd. A run's
    schedules add the method's own to these (methods.build_schedules)."""
    o, epochs = cfg.optim, cfg.train.epochs
    peak = o.base_lr * global_batch / 256
    return {
        "lr": cosine_schedule(peak, o.min_lr, epochs, iters_per_epoch, o.warmup_epochs, o.start_warmup_lr),
        "wd": cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, iters_per_epoch),
    }
