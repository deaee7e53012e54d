"""MoCo-v2 with multi-crop queries and LAMBDAS re-weighting (reference src/sslight/model/moco.py,
utils/loss.py:170-200)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..models import build_backbone
from ..settings import setting
from .common import (HeadCfg, MomentumTeacher, MultiCropNet, all_gather_cat, broadcast_from_rank0_, build_mlp,
                     ema_update_, feature_dim, float32, lambdas_weighting, momentum_copy, trunc_normal_init_)
from .registry import register_method


@dataclass
class MocoCfg(HeadCfg):
    """The `moco:` config section (reference MoCo-v2 settings; the head's are HeadCfg's defaults)."""
    temperature: float = setting(0.2, 1e-4, 10.0)
    queue_length: int = setting(65536, 1)
    momentum: float = setting(0.999, 0.0, 1.0, "key-encoder EMA momentum, fixed (a constant `momentum` schedule)")


@dataclass
class MocoConfig(Config):
    method: str = "moco"
    moco: MocoCfg = field(default_factory=MocoCfg)


@register_method("moco", config=MocoConfig)
class MoCo(MomentumTeacher[MocoConfig]):
    """The key encoder follows the query encoder by EMA with the fixed `moco.momentum`, after each
    optimizer step: the same update as the reference's at the start of the next forward, before the
    keys are computed (the query encoder does not change in between)."""
    resume_keys = ("out_dim", "hidden_dim", "num_layers", "use_bn_in_head", "queue_length")
    backbone_keys = {"student": "encoder_q.backbone.", "teacher": "encoder_k.backbone."}
    queue: torch.Tensor         # buffers: the key queue [dim, length], its write position
    queue_ptr: torch.Tensor

    @classmethod
    def momentum_range(cls, cfg: MocoConfig) -> tuple[float, float]:
        return cfg.moco.momentum, cfg.moco.momentum

    def __init__(self, cfg: MocoConfig, num_classes: int):
        c = cfg.moco
        backbone = build_backbone(cfg.model.backbone, cfg.model.drop_path_rate)
        super().__init__(cfg, num_classes, feature_dim(backbone))
        head = build_mlp(feature_dim(backbone), c.hidden_dim, c.out_dim, c.num_layers, c.use_bn_in_head, nn.ReLU)
        trunc_normal_init_(head)
        self.encoder_q = MultiCropNet(backbone, head)
        self.encoder_k = momentum_copy(self.encoder_q, cfg.model.backbone)
        # Random unit keys until real ones replace them, the same on every rank (rank 0's draw, as
        # the reference's DDP start-up copy gives): ranks are seeded differently, and the gathered
        # keys written later keep equal queues equal only if they start equal.
        queue = F.normalize(torch.randn(c.out_dim, c.queue_length), dim=0)
        self.register_buffer("queue", broadcast_from_rank0_(queue))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.temperature = c.temperature
        self.momentum = c.momentum
        self.num_global = cfg.recipe.global_.count

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    def ema_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.encoder_k, self.encoder_q

    def after_resume(self, state: dict) -> None:
        # A checkpoint without "ema_after_step" (our earlier code, or the reference's) holds the key
        # encoder before the update its next forward would have applied first; apply it here.
        if not state.get("ema_after_step"):
            ema_update_(*self.ema_pair(), self.momentum)

    def ssl_forward(self, views, epoch):
        # Not symmetric: global 1 is only the key; global 2 and the locals are queries.
        queries = views[1:]
        feats, q = self.encoder_q(queries)
        with torch.no_grad():
            # No ShuffleBN: with SyncBN (or one process) the key BN statistics already span the
            # global batch, so shuffling samples across GPUs changes nothing (the reference converts the
            # whole model to SyncBN, src/sslight/engine/trainer.py:172-173, and still shuffles).
            _, k = self.encoder_k(views[:1])
        with float32(q):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.float(), dim=1)
            n, bs = len(queries), k.shape[0]
            l_pos = (q.view(n, bs, -1) * k).sum(-1).reshape(-1, 1)
            l_neg = q @ self.queue.clone()  # clone: autograd keeps it while the queue is updated below
            logits = torch.cat((l_pos, l_neg), dim=1) / self.temperature
            target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
            ce = F.cross_entropy(logits, target, reduction="none").view(n, bs).mean(dim=1)
        n_gq = self.num_global - 1  # query crops that are global views
        loss, gg, gl = lambdas_weighting(list(ce[:n_gq]), list(ce[n_gq:]), self.lambdas)
        self.enqueue(k)
        metrics = dict(gg_loss=gg.detach(), gl_loss=gl.detach(), pos_sim=l_pos.detach().mean())
        return loss, metrics, feats[:bs]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Ring-buffer write of the all-gathered keys; device-side pointer, so no host sync."""
        keys = all_gather_cat(keys)
        length = self.queue.shape[1]
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % length
        self.queue.index_copy_(1, idx, keys.t().to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % length)
