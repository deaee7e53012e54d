"""Mechanics shared by DINO, SwAV and MoCo: heads, multi-crop forward, LAMBDAS weighting,
EMA, gradient freezing, the joint linear probe and distributed helpers."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..models import build_backbone
from ..optim import cosine_schedule, group_of
from ..runtime import is_distributed as dist_on, torch_device, world_size  # noqa: F401 (world_size: methods use it)
from ..settings import ConfigError, setting


# ------------------------------------------------------------------------------------------
# Distributed helpers (every one is a no-op in a single process)
# ------------------------------------------------------------------------------------------
def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if dist_on():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def broadcast_from_rank0_(t: torch.Tensor) -> torch.Tensor:
    """Overwrite `t` with rank 0's copy. For buffers that every rank must hold equal from the start:
    the trainer's DDP runs with broadcast_buffers=False, which also skips DDP's start-up buffer sync."""
    if not dist_on():
        return t
    # NCCL moves only CUDA tensors; methods are built on the CPU before `.to(device)`.
    dev = torch_device("gpu") if dist.get_backend() == "nccl" else t.device
    buf = t.to(dev)
    dist.broadcast(buf, src=0)
    t.copy_(buf)
    return t


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0 (no gradient flows back)."""
    if not dist_on():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------
def float32(x: torch.Tensor):
    """Disable autocast: logits that are divided by small temperatures (0.04-0.2) or exponentiated
    by Sinkhorn (1/0.05) must not carry bf16 rounding (the reference trains in fp32)."""
    return torch.autocast(device_type=x.device.type, enabled=False) if torch.is_autocast_enabled(
        x.device.type) else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------
# Heads and the multi-crop wrapper
# ------------------------------------------------------------------------------------------
@dataclass
class HeadCfg:
    """The config fields of a projection MLP (build_mlp); the defaults are MoCo-v2's head."""
    out_dim: int = setting(128, 1)
    hidden_dim: int = setting(2048, 1)
    num_layers: int = setting(2, 1, 8)
    use_bn_in_head: bool = False


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, use_bn: bool,
              act: type[nn.Module]) -> nn.Sequential:
    """Linear[-BN]-act repeated num_layers-1 times, then Linear(-> out_dim).
    Indices match the reference (`mlp.0/.1/.3/.4` are the first two Linear+BN in DINO)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < num_layers - 1:
            if use_bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(act())
    return nn.Sequential(*layers)


def trunc_normal_init_(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def resolution_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive crops sharing a resolution (host-side shapes)."""
    bounds, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            bounds.append((start, i))
            start = i
    return bounds


H = TypeVar("H", bound=nn.Module)


def feature_dim(backbone: nn.Module) -> int:
    """The pooled feature size of a models.build_backbone backbone (timm's int `num_features`, which
    nn.Module's attribute typing cannot know)."""
    return cast(int, backbone.num_features)


class MultiCropNet(nn.Module, Generic[H]):
    """Backbone + head on a list of crops: one backbone pass per resolution group (so backbone
    BN sees each resolution separately), one head pass on all embeddings (head BN sees them mixed)."""
    head: H

    def __init__(self, backbone: nn.Module, head: H):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]):
        feats = torch.cat([self.backbone(torch.cat(crops[s:e])) for s, e in resolution_groups(crops)])
        return feats, self.head(feats)


def momentum_copy(net: MultiCropNet[H], backbone_name: str) -> MultiCropNet[H]:
    """Gradient-free twin of `net` (DINO teacher, MoCo key encoder): same weights, no drop path."""
    twin = MultiCropNet(build_backbone(backbone_name, drop_path_rate=0.0), copy.deepcopy(net.head))
    twin.load_state_dict(net.state_dict())
    return twin.requires_grad_(False)


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------
def lambdas_weighting(gg: list[torch.Tensor], gl: list[torch.Tensor], lambdas):
    """`alpha * mean(gg) + beta * mean(gl)` (reference src/sslight/utils/loss.py:56-60). Weighting is
    per group mean, so the baseline LAMBDAS [2/(2+2N), 2N/(2+2N)] reproduce the uniform mean over all
    pairs. An empty group (no local crops) contributes nothing. Returns (loss, gg_mean, gl_mean)."""
    alpha, beta = lambdas
    ref = (gg or gl)[0]
    gg_mean = torch.stack(gg).mean() if gg else ref.new_zeros(())
    gl_mean = torch.stack(gl).mean() if gl else ref.new_zeros(())
    return alpha * gg_mean + beta * gl_mean, gg_mean, gl_mean


def swapped_prediction_loss(targets: dict[int, torch.Tensor], log_probs: Sequence[torch.Tensor],
                            lambdas, num_global: int = 2):
    """DINO/SwAV cross-view CE: for each target crop iq and each other crop v,
    mean_b sum_k -q_iq * log p_v. A pair is global-global when both indices are < num_global."""
    gg: list[torch.Tensor] = []
    gl: list[torch.Tensor] = []
    for iq, q in targets.items():
        for v, logp in enumerate(log_probs):
            if v == iq:
                continue
            loss = torch.sum(-q * logp, dim=-1).mean()
            (gg if iq < num_global and v < num_global else gl).append(loss)
    return lambdas_weighting(gg, gl, lambdas)


# ------------------------------------------------------------------------------------------
# Parameter updates
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * source over parameters only: BN running stats of the
    target come from its own train-mode forwards (reference src/sslight/engine/dino_trainer.py:85-89)."""
    t: list[torch.Tensor] = list(target.parameters())
    s: list[torch.Tensor] = list(source.parameters())
    assert len(t) == len(s), "EMA pair must have the same architecture"
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def cancel_gradients_(module: nn.Module, name_contains: str) -> None:
    for name, p in module.named_parameters():
        if name_contains in name:
            p.grad = None


# ------------------------------------------------------------------------------------------
# Base class: the joint probe and the hooks the trainer calls
# ------------------------------------------------------------------------------------------
C = TypeVar("C", bound=Config)  # the method's Config subclass (DinoConfig), which holds its section


class SSLMethod(nn.Module, Generic[C]):
    """Subclasses implement `ssl_forward(views, epoch) -> (loss, metrics, probe_features)` and
    the `backbone` property; set `self.frozen = (name_substring, epochs)` for an early freeze.
    Every method's constructor takes (cfg, num_classes) and passes the backbone's feature size on.
    Registered with `@register_method(name, config=ItsConfig)`, which sets `name` and `config`.

    What else a method may declare (the defaults suit a method without any of it):
    - `resume_keys`: keys of its config section that shape its state; a checkpoint resumes only
      with the same values (the generic keys are in run_policy.RESUME_KEYS).
    - `backbone_keys`: state_dict prefix of the backbone, {"student": ..., "teacher": ...}.
    - `global_views`: the number of global views it needs, if fixed (checked by check_config).
    - `check_config(cfg)`: cross-field checks, raising ConfigError (call super's: it checks global_views).
    - `schedules(cfg, iters_per_epoch)`: per-iteration arrays; the trainer logs each one and passes
      its value at every step to `after_step` as a keyword argument.
    - `param_group(name, p)`: the optimizer group of a parameter (optim.GROUPS).
    """

    name: str = ""
    config: type[Config] = Config
    resume_keys: tuple[str, ...] = ()
    backbone_keys: dict[str, str] = {}
    global_views: int | None = None
    frozen: tuple[str, int] | None = None
    # Buffers that differ by rank (SwAV's queue holds this rank's own embeddings): the trainer's
    # checkpoint keeps one copy per rank, beside the loader and RNG states.
    per_rank_buffers: tuple[str, ...] = ()

    def __init__(self, cfg: C, num_classes: int, feat_dim: int):
        super().__init__()
        self.lambdas = tuple(float(x) for x in cfg.recipe.loss_weights)
        use_probe = cfg.train.joint_linear_probe and num_classes > 0
        self.probe = nn.Linear(feat_dim, num_classes) if use_probe else None

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def ssl_forward(self, views: list[torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None, epoch: int):
        loss, metrics, probe_feats = self.ssl_forward(views, epoch)
        metrics["ssl_loss"] = loss.detach()
        if self.probe is not None and labels is not None:
            # Detached features: the probe's CE trains only the classifier (reference src/sslight/model/dino.py:118).
            logits = self.probe(probe_feats.detach())
            probe_loss = F.cross_entropy(logits.float(), labels)
            loss = loss + probe_loss
            metrics["probe_loss"] = probe_loss.detach()
            metrics["probe_acc"] = (logits.argmax(-1) == labels).float().mean().detach()
        return loss, metrics

    def rank_state(self) -> dict:
        """This rank's per-rank buffers by name (CPU copies, for gathering into a checkpoint). With
        several processes and plain BatchNorm (SyncBatchNorm is CUDA-only) the BN statistics are
        per rank too."""
        names = list(self.per_rank_buffers)
        if world_size() > 1:
            for prefix, m in self.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
                    names += [f"{prefix}.{n}" for n, _ in m.named_buffers(recurse=False)]
        return {k: self.get_buffer(k).detach().cpu().clone() for k in names}

    @torch.no_grad()
    def load_rank_state(self, state: dict) -> None:
        for k, v in state.items():
            self.get_buffer(k).copy_(v)

    def after_backward(self, epoch: int) -> None:
        if self.frozen is not None and epoch < self.frozen[1]:
            cancel_gradients_(self, self.frozen[0])

    def after_step(self, step: int, **schedules: float) -> None:
        """After each optimizer step, with the value at `step` of each of the method's `schedules`."""

    def after_resume(self, state: dict) -> None:
        """After the trainer loaded `state` (a whole checkpoint): bring one written by earlier code up to date."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    @classmethod
    def check_config(cls, cfg: C) -> None:
        n = cls.global_views
        if n is not None and cfg.recipe.global_.count != n:
            raise ConfigError(f"recipe.global.count: {cls.name} uses exactly {n} global views")

    @classmethod
    def schedules(cls, cfg: C, iters_per_epoch: int) -> dict[str, np.ndarray]:
        return {}

    def param_group(self, name: str, p: torch.Tensor) -> str:
        return group_of(p)


class MomentumTeacher(SSLMethod[C]):
    """A network and a gradient-free twin that follows it by EMA after each optimizer step (DINO's
    teacher, MoCo's key encoder): `ema_pair()` names them. The momentum is the method's `momentum`
    schedule, so the value logged is the value applied: a per-iteration cosine between the two values
    of `momentum_range(cfg)` (reference: DINO's cosine_scheduler; start == end is a fixed momentum)."""

    @classmethod
    def momentum_range(cls, cfg: C) -> tuple[float, float]:
        """(start, end) of the EMA momentum, from the method's section."""
        raise NotImplementedError

    def ema_pair(self) -> tuple[nn.Module, nn.Module]:
        """(the twin that follows, the trained network it follows)."""
        raise NotImplementedError

    @classmethod
    def schedules(cls, cfg: C, iters_per_epoch: int) -> dict[str, np.ndarray]:
        start, end = cls.momentum_range(cfg)
        return {"momentum": cosine_schedule(start, end, cfg.train.epochs, iters_per_epoch)}

    def after_step(self, step: int, **schedules: float) -> None:
        ema_update_(*self.ema_pair(), float(schedules["momentum"]))


def scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim metric on `like`'s device without a host-to-device copy."""
    return torch.full((), float(value), device=like.device)

