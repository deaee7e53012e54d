"""DINO with multi-crop and LAMBDAS re-weighting (reference src/sslight/model/dino.py, utils/loss.py:7-76)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..models import build_backbone
from ..settings import setting
from .common import (MomentumTeacher, MultiCropNet, all_reduce_sum_, build_mlp, feature_dim, float32,
                     momentum_copy, scalar, swapped_prediction_loss, trunc_normal_init_, world_size)
from .registry import register_method


@dataclass
class DinoCfg:
    """The `dino:` config section; the defaults are the reference's CNN runs (ViT configs override)."""
    out_dim: int = setting(4096, 1)
    hidden_dim: int = setting(2048, 1)
    bottleneck_dim: int = setting(256, 1)
    num_layers: int = setting(3, 1, 8)
    use_bn_in_head: bool = True
    norm_last_layer: bool = True
    student_temp: float = setting(0.1, 1e-4, 10.0)
    warmup_teacher_temp: float = setting(0.04, 1e-4, 10.0)
    teacher_temp: float = setting(0.07, 1e-4, 10.0)
    warmup_teacher_temp_epochs: int = setting(50, 0)
    center_momentum: float = setting(0.9, 0.0, 1.0)
    freeze_last_layer_epochs: int = setting(1, 0)
    momentum_teacher: float = setting(0.996, 0.0, 1.0, "EMA start, cosine to momentum_teacher_end per iteration")
    momentum_teacher_end: float = setting(1.0, 0.0, 1.0)


@dataclass
class DinoConfig(Config):
    method: str = "dino"
    dino: DinoCfg = field(default_factory=DinoCfg)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with W = g * v / ||v|| per output row. Explicit g/v parameters (named as
    torch's legacy weight_norm, like the reference's checkpoints) so `weight_g` can be frozen."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default: created after the MLP init
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, w)


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2-norm -> weight-normed prototypes (BN in the MLP for CNNs)."""

    def __init__(self, in_dim: int, c):
        super().__init__()
        self.mlp = build_mlp(in_dim, c.hidden_dim, c.bottleneck_dim, c.num_layers, c.use_bn_in_head, nn.GELU)
        trunc_normal_init_(self.mlp)
        self.last_layer = WeightNormLinear(c.bottleneck_dim, c.out_dim)
        self.last_layer.weight_g.requires_grad_(not c.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        with float32(x):
            return self.last_layer(F.normalize(x.float(), dim=-1))


def teacher_temp_schedule(c, epochs: int) -> np.ndarray:
    """Per-EPOCH teacher temperature: linear warmup then constant (reference src/sslight/utils/loss.py:21-24)."""
    warm = np.linspace(c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)
    return np.concatenate((warm, np.full(max(epochs - len(warm), 0), c.teacher_temp)))


@register_method("dino", config=DinoConfig)
class DINO(MomentumTeacher[DinoConfig]):
    global_views: int = 2
    resume_keys = ("out_dim", "hidden_dim", "bottleneck_dim", "num_layers", "use_bn_in_head", "norm_last_layer")
    backbone_keys = {"student": "student.backbone.", "teacher": "teacher.backbone."}
    center: torch.Tensor  # a buffer: the EMA of the teacher's mean output

    @classmethod
    def momentum_range(cls, cfg: DinoConfig) -> tuple[float, float]:
        return cfg.dino.momentum_teacher, cfg.dino.momentum_teacher_end

    def __init__(self, cfg: DinoConfig, num_classes: int):
        c = cfg.dino
        backbone = build_backbone(cfg.model.backbone, cfg.model.drop_path_rate)
        super().__init__(cfg, num_classes, feature_dim(backbone))
        self.student = MultiCropNet(backbone, DINOHead(feature_dim(backbone), c))
        self.teacher = momentum_copy(self.student, cfg.model.backbone)
        # The center lives with the model so that state_dict() resumes it.
        self.register_buffer("center", torch.zeros(1, c.out_dim))
        self.student_temp = c.student_temp
        self.center_momentum = c.center_momentum
        self.teacher_temps = teacher_temp_schedule(c, cfg.train.epochs)
        self.frozen = ("last_layer", c.freeze_last_layer_epochs)

    @property
    def backbone(self) -> nn.Module:
        return self.student.backbone

    def ema_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.teacher, self.student

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def ssl_forward(self, views, epoch):
        with torch.no_grad():
            _, t_out = self.teacher(views[:self.global_views])  # teacher: the 2 globals, train-mode BN
        feats, s_out = self.student(views)
        temp = self.teacher_temp(epoch)
        with float32(s_out):
            t_out = t_out.float()
            q = F.softmax((t_out - self.center) / temp, dim=-1)
            logp = F.log_softmax(s_out.float() / self.student_temp, dim=-1).chunk(len(views))
            loss, gg, gl = swapped_prediction_loss(dict(enumerate(q.chunk(self.global_views))), logp,
                                                   self.lambdas, self.global_views)
            entropy = torch.special.entr(q).sum(-1).mean()
        self.update_center(t_out)
        metrics = dict(gg_loss=gg.detach(), gl_loss=gl.detach(), teacher_temp=scalar(temp, loss),
                       teacher_entropy=entropy.detach())
        return loss, metrics, feats[:views[0].shape[0]]

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the mean teacher logit over both globals of the whole (all-rank) batch."""
        batch_center = all_reduce_sum_(teacher_out.sum(dim=0, keepdim=True))
        batch_center /= len(teacher_out) * world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
