"""SwAV with multi-crop, a feature queue and LAMBDAS re-weighting (reference src/sslight/model/swav.py,
utils/loss.py:78-168)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..models import reference_conv_bn_init_, build_backbone
from ..settings import ConfigError, setting, setting_list
from .common import (HeadCfg, MultiCropNet, SSLMethod, all_reduce_sum_, build_mlp, feature_dim, float32,
                     scalar, swapped_prediction_loss, world_size)
from .registry import register_method


@dataclass
class SwavCfg(HeadCfg):
    """The `swav:` config section (reference SwAV settings)."""
    hidden_dim: int = setting(4096, 1)
    use_bn_in_head: bool = True
    num_prototypes: int = setting(3000, 1)
    temperature: float = setting(0.1, 1e-4, 10.0)
    epsilon: float = setting(0.05, 1e-6, 10.0)
    sinkhorn_iterations: int = setting(3, 1, 100)
    queue_length: int = setting(3840, 0, help="rounded down to a multiple of the global batch, as in the reference")
    epoch_queue_starts: int = setting(15, 0)
    freeze_prototypes_epochs: int = setting(1, 0)
    crops_for_assign: list[int] = setting_list([0, 1])


@dataclass
class SwavConfig(Config):
    method: str = "swav"
    swav: SwavCfg = field(default_factory=SwavCfg)


class SwAVHead(nn.Module):
    """Projection MLP -> L2-norm -> prototypes; returns (embedding, prototype scores)."""

    def __init__(self, in_dim: int, c):
        super().__init__()
        self.projection = build_mlp(in_dim, c.hidden_dim, c.out_dim, c.num_layers, c.use_bn_in_head, nn.ReLU)
        self.prototypes = nn.Linear(c.out_dim, c.num_prototypes, bias=False)

    def forward(self, x: torch.Tensor):
        x = self.projection(x)
        with float32(x):  # scores feed exp(score / 0.05) in Sinkhorn: keep them fp32
            z = F.normalize(x.float(), dim=1)
            return z, self.prototypes(z)


def swav_init_(model: nn.Module) -> None:
    """The reference re-initialises the WHOLE model (backbone, head, probe), as official SwAV does."""
    reference_conv_bn_init_(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def distributed_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Equipartitioned soft assignments [B, K] of this rank's rows, normalised over all ranks."""
    q = torch.exp(scores.float() / epsilon).t()  # K x B
    k, b = q.shape[0], q.shape[1] * world_size()
    q /= all_reduce_sum_(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum_(q.sum(dim=1, keepdim=True))  # each prototype gets total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample gets total mass 1/B
        q /= b
    q *= b  # columns become probability distributions
    return q.t()


def queue_rows_per_rank(queue_length: int, batch_size: int, ranks: int) -> int:
    """The reference silently rounds the queue down to a multiple of the global batch."""
    return (queue_length - queue_length % (batch_size * ranks)) // ranks


@register_method("swav", config=SwavConfig)
class SwAV(SSLMethod[SwavConfig]):
    global_views = 2
    resume_keys = ("out_dim", "hidden_dim", "num_layers", "use_bn_in_head", "num_prototypes", "queue_length")
    backbone_keys = {"student": "network.backbone.", "teacher": "network.backbone."}  # one network
    queue: torch.Tensor         # buffers: the queue of each crop in crops_for_assign, its fill count
    queue_filled: torch.Tensor

    @classmethod
    def check_config(cls, cfg: SwavConfig) -> None:
        super().check_config(cfg)
        r, c = cfg.recipe, cfg.swav
        if not c.crops_for_assign or any(not 0 <= i < r.global_.count for i in c.crops_for_assign):
            raise ConfigError(f"swav.crops_for_assign: {c.crops_for_assign} must name global views "
                              f"(0..{r.global_.count - 1} of the {r.global_.count + r.local.count} views)")

    def __init__(self, cfg: SwavConfig, num_classes: int):
        c = cfg.swav
        backbone = build_backbone(cfg.model.backbone, cfg.model.drop_path_rate)
        super().__init__(cfg, num_classes, feature_dim(backbone))
        self.network = MultiCropNet(backbone, SwAVHead(feature_dim(backbone), c))
        swav_init_(self)
        self.temperature, self.epsilon, self.iterations = c.temperature, c.epsilon, c.sinkhorn_iterations
        self.crops_for_assign = list(c.crops_for_assign)
        self.epoch_queue_starts = c.epoch_queue_starts
        self.frozen = ("prototypes", c.freeze_prototypes_epochs)
        # Allocated up front so state_dict() always has the same keys; it starts being filled at
        # epoch_queue_starts. queue_filled: -1 = not started, else rows filled (mirrored on the
        # host in self._filled so the forward never syncs to read it).
        rows = queue_rows_per_rank(c.queue_length, cfg.train.batch_size, world_size())
        self.register_buffer("queue", torch.zeros(len(self.crops_for_assign), rows, c.out_dim))
        self.register_buffer("queue_filled", torch.full((), -1, dtype=torch.long))
        self._filled: int | None = -1

    per_rank_buffers = ("queue", "queue_filled")

    @property
    def backbone(self) -> nn.Module:
        return self.network.backbone

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._filled = None  # re-read from the loaded buffer on next use

    def load_rank_state(self, state: dict) -> None:
        super().load_rank_state(state)
        self._filled = None

    @property
    def filled(self) -> int:
        if self._filled is None:
            self._filled = int(self.queue_filled)
        return self._filled

    def _set_filled(self, value: int) -> None:
        self._filled = value
        self.queue_filled.fill_(value)

    def on_epoch_start(self, epoch: int) -> None:
        if self.queue.shape[1] > 0 and epoch >= self.epoch_queue_starts and self.filled < 0:
            self._set_filled(0)

    def ssl_forward(self, views, epoch):
        with torch.no_grad():
            w = self.network.head.prototypes.weight
            w.copy_(F.normalize(w, dim=1))
        feats, (z, scores) = self.network(views)
        bs = views[0].shape[0]
        with float32(scores):
            use_queue = self.queue_in_use()
            targets = self.assign(z.detach(), scores.detach().float(), bs, use_queue)
            logp = F.log_softmax(scores.float() / self.temperature, dim=-1).chunk(len(views))
            loss, gg, gl = swapped_prediction_loss(targets, logp, self.lambdas)
        metrics = dict(gg_loss=gg.detach(), gl_loss=gl.detach(), queue_in_use=scalar(use_queue, loss))
        return loss, metrics, feats[:bs]

    def queue_in_use(self) -> bool:
        # The reference switches the queue on once its last row is non-zero, i.e. once full.
        rows = self.queue.shape[1]
        return rows > 0 and self.filled >= rows

    @torch.no_grad()
    def assign(self, z, scores, bs, use_queue):
        """Sinkhorn codes for each crop in crops_for_assign; pushes that crop's embeddings."""
        targets = {}
        active = self.filled >= 0
        for i, crop in enumerate(self.crops_for_assign):
            out = scores[bs * crop: bs * (crop + 1)]
            if use_queue:
                out = torch.cat((self.queue[i] @ self.network.head.prototypes.weight.t(), out))
            if active:
                self.queue[i, bs:] = self.queue[i, :-bs].clone()
                self.queue[i, :bs] = z[bs * crop: bs * (crop + 1)]
            targets[crop] = distributed_sinkhorn(out, self.epsilon, self.iterations)[-bs:]
        if active:
            self._set_filled(min(self.filled + bs, self.queue.shape[1]))
        return targets
