"""Each method's loss against a plain re-computation from the formulas (reference src/sslight/utils/loss.py).

The method's networks are replaced by stubs returning fixed random outputs, so the real forward
(chunking, temperatures, centering, LAMBDAS, queues) runs on known tensors. The expected values are
computed here in float64 with loops over pairs / rows, without calling the package's loss code.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslight_dali.run_config import load_config
from sslight_dali.methods import build_method
from sslight_dali.methods.swav import distributed_sinkhorn

B = 4
TINY = ["recipe.global.size=32", "recipe.local.size=16", "dino.out_dim=32", "dino.hidden_dim=16",
        "dino.bottleneck_dim=8", "swav.num_prototypes=24", "swav.hidden_dim=16", "moco.hidden_dim=16",
        "moco.queue_length=40", "model.backbone=resnet18", f"train.batch_size={B}"]


class Stub(nn.Module):
    """Stands in for a MultiCropNet: returns preset (features, head output); records its inputs."""

    def __init__(self, feats, out, head=None):
        super().__init__()
        self.feats, self.out = feats, out
        self.dummy = nn.Parameter(torch.zeros(1))  # something for EMA to touch
        self.head = head if head is not None else nn.Identity()
        self.calls = []

    def forward(self, crops):
        self.calls.append([c.shape for c in crops])
        return self.feats, self.out


def log_softmax_ref(x):
    x = x.double()
    m = x.max()
    return x - m - math.log(float(torch.exp(x - m).sum()))


def softmax_ref(x):
    return torch.exp(log_softmax_ref(x))


def pair_ce(q, s):
    """mean over rows of sum_k -q * log_softmax(s), row by row."""
    return sum(float(-(q[b] * log_softmax_ref(s[b])).sum()) for b in range(len(q))) / len(q)


def views_for(cfg):
    n_g, n_l = cfg.recipe.global_.count, cfg.recipe.local.count
    return ([torch.randn(B, 3, 32, 32) for _ in range(n_g)] + [torch.randn(B, 3, 16, 16) for _ in range(n_l)])


# ------------------------------------------------------------------------------------------ DINO
def dino_reference(s_out, t_out, center, t_temp, s_temp, n_crops, lambdas):
    s = s_out.double().chunk(n_crops)
    t = t_out.double().chunk(2)
    q = [torch.stack([softmax_ref((t[i][b] - center[0].double()) / t_temp) for b in range(B)]) for i in range(2)]
    gg, gl = [], []
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            (gg if v < 2 else gl).append(pair_ce(q[iq], s[v] / s_temp))
    return lambdas[0] * sum(gg) / len(gg) + lambdas[1] * sum(gl) / len(gl), gg + gl


@pytest.mark.parametrize("config,epoch", [("configs/dino/resnet18_baseline.yaml", 0),
                                          ("configs/dino/resnet18_sslight.yaml", 7),
                                          ("configs/dino/vit_tiny_sslight.yaml", 40)])
def test_dino_loss_matches_formula(config, epoch):
    torch.manual_seed(0)
    cfg = load_config(config, TINY[:-2] + [f"train.batch_size={B}"])
    n_crops = 2 + cfg.recipe.local.count
    K = cfg.dino.out_dim
    m = build_method(cfg, 0)
    s_out, t_out = torch.randn(n_crops * B, K) * 3, torch.randn(2 * B, K) * 3
    m.student, m.teacher = Stub(torch.zeros(n_crops * B, 5), s_out), Stub(None, t_out)
    center0 = torch.randn(1, K)
    m.center.copy_(center0)
    views = views_for(cfg)

    loss, metrics = m(views, None, epoch)

    W = cfg.dino.warmup_teacher_temp_epochs
    t_temp = 0.04 + (0.07 - 0.04) * epoch / (W - 1) if epoch < W else 0.07
    expected, pairs = dino_reference(s_out, t_out, center0, t_temp, 0.1, n_crops, cfg.recipe.loss_weights)
    assert float(metrics["teacher_temp"]) == pytest.approx(t_temp)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert len(pairs) == 2 + 2 * cfg.recipe.local.count
    if "baseline" in config:  # baseline LAMBDAS == uniform mean over the 2 + 2N pairs
        assert loss.item() == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    else:
        assert loss.item() != pytest.approx(sum(pairs) / len(pairs), rel=1e-3)
    # teacher saw only the two globals; center = 0.9 c + 0.1 mean(teacher logits over both globals)
    assert m.teacher.calls == [[views[0].shape, views[1].shape]]
    torch.testing.assert_close(m.center, 0.9 * center0 + 0.1 * t_out.mean(0, keepdim=True))


def test_sslight_pair_weights():
    """SSLight: each gg pair weighs 0.2 and each gl pair 0.6/(2N): check via d loss / d pair."""
    from sslight_dali.methods.common import lambdas_weighting
    gg = [torch.tensor(1.0, requires_grad=True) for _ in range(2)]
    gl = [torch.tensor(1.0, requires_grad=True) for _ in range(12)]
    loss, _, _ = lambdas_weighting(gg, gl, (0.4, 0.6))
    loss.backward()
    assert [float(x.grad) for x in gg] == pytest.approx([0.2] * 2)
    assert [float(x.grad) for x in gl] == pytest.approx([0.05] * 12)


# ------------------------------------------------------------------------------------------ SwAV
def sinkhorn_reference(scores, eps, iters):
    Q = torch.exp(scores.double() / eps).t().clone()  # K x B
    K, Bn = Q.shape
    Q = Q / Q.sum()
    for _ in range(iters):
        for k in range(K):
            Q[k] = Q[k] / Q[k].sum() / K
        for b in range(Bn):
            Q[:, b] = Q[:, b] / Q[:, b].sum() / Bn
    return (Q * Bn).t()


def test_sinkhorn_matches_reference_and_marginals():
    torch.manual_seed(0)
    scores = torch.randn(16, 10).clamp(-1, 1)
    q = distributed_sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(q.double(), sinkhorn_reference(scores, 0.05, 3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.sum(1), torch.ones(16))  # each sample: a distribution
    q_long = distributed_sinkhorn(scores, 0.05, 300)  # equipartition once converged
    torch.testing.assert_close(q_long.sum(0), torch.full((10,), 16 / 10), rtol=1e-3, atol=1e-3)


def swav_stub(m, n_crops, K, D=128):
    z = nn.functional.normalize(torch.randn(n_crops * B, D), dim=1)
    scores = torch.randn(n_crops * B, K).clamp(-1, 1)
    head = nn.Module()
    head.prototypes = nn.Linear(D, K, bias=False)
    m.network = Stub(torch.zeros(n_crops * B, 5), (z, scores), head)
    return z, scores


@pytest.mark.parametrize("config", ["configs/swav/mobilenetv2_baseline.yaml",
                                    "configs/swav/mobilenetv2_sslight.yaml"])
def test_swav_loss_matches_formula(config):
    torch.manual_seed(0)
    cfg = load_config(config, TINY)
    n_crops = 2 + cfg.recipe.local.count
    m = build_method(cfg, 0)
    _, scores = swav_stub(m, n_crops, cfg.swav.num_prototypes)
    loss, metrics = m(views_for(cfg), None, 0)

    s = scores.chunk(n_crops)
    gg, gl = [], []
    for crop in (0, 1):
        q = sinkhorn_reference(s[crop], 0.05, 3)
        for v in range(n_crops):
            if v != crop:
                (gg if v < 2 else gl).append(pair_ce(q, s[v] / 0.1))
    a, b = cfg.recipe.loss_weights
    assert loss.item() == pytest.approx(a * sum(gg) / 2 + b * sum(gl) / len(gl), rel=1e-5)
    if "baseline" in config:
        assert loss.item() == pytest.approx((sum(gg) + sum(gl)) / (len(gg) + len(gl)), rel=1e-5)
    assert float(metrics["queue_in_use"]) == 0.0


def test_swav_queue_fills_then_feeds_sinkhorn():
    torch.manual_seed(0)
    cfg = load_config("configs/swav/mobilenetv2_sslight.yaml",
                      TINY + ["swav.queue_length=10", "swav.epoch_queue_starts=2"])
    m = build_method(cfg, 0)
    rows = m.queue.shape[1]
    assert rows == 8  # 10 rounded down to a multiple of the global batch 4
    n_crops = 2 + cfg.recipe.local.count
    views = views_for(cfg)
    m.on_epoch_start(1)  # before epoch_queue_starts: queue idle
    swav_stub(m, n_crops, cfg.swav.num_prototypes)
    m(views, None, 1)
    assert m.filled == -1 and float(m.queue.abs().sum()) == 0
    m.on_epoch_start(2)
    history = []
    for it in range(3):
        z, scores = swav_stub(m, n_crops, cfg.swav.num_prototypes)
        proto = m.network.head.prototypes.weight
        queue_before = m.queue.clone()
        _, metrics = m(views, None, 2)
        history.append(z)
        # full only after rows / B = 2 iterations, and used from the next one
        assert float(metrics["queue_in_use"]) == (1.0 if it == 2 else 0.0)
    # queue holds the newest embeddings on top, per crop used for assignment
    for i, crop in enumerate((0, 1)):
        torch.testing.assert_close(m.queue[i, :B], history[2][crop * B:(crop + 1) * B])
        torch.testing.assert_close(m.queue[i, B:], history[1][crop * B:(crop + 1) * B])
    # last iteration's targets: Sinkhorn over [queue @ protos^T ; scores], rows of this batch
    w = nn.functional.normalize(proto.detach(), dim=1)
    out = torch.cat((queue_before[0] @ w.t(), scores[:B]))
    expected = sinkhorn_reference(out, 0.05, 3)[-B:]
    got = m.assign(history[2].detach(), scores, B, use_queue=False)  # sanity: differs without queue
    assert not torch.allclose(got[0].double(), expected, atol=1e-4)
    m.queue.copy_(queue_before)
    got = m.assign(history[2].detach(), scores, B, use_queue=True)
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ MoCo
@pytest.mark.parametrize("config", ["configs/moco/mobilenetv2_baseline.yaml",
                                    "configs/moco/mobilenetv2_sslight.yaml"])
def test_moco_multi_query_loss_matches_formula(config):
    torch.manual_seed(0)
    cfg = load_config(config, TINY)
    n_q, D, L = 1 + cfg.recipe.local.count, cfg.moco.out_dim, cfg.moco.queue_length
    m = build_method(cfg, 0)
    q_raw, k_raw = torch.randn(n_q * B, D), torch.randn(B, D)
    m.encoder_q, m.encoder_k = Stub(torch.zeros(n_q * B, 5), q_raw), Stub(None, k_raw)
    m.queue_ptr.fill_(L - 2)  # the enqueue wraps around
    queue0 = m.queue.clone()
    views = views_for(cfg)
    loss, _ = m(views, None, 0)

    q = nn.functional.normalize(q_raw.double(), dim=1)
    k = nn.functional.normalize(k_raw.double(), dim=1)
    ces = []
    for i in range(n_q):
        total = 0.0
        for b in range(B):
            row = q[i * B + b]
            logits = torch.cat((torch.stack([row @ k[b]]), queue0.double().t() @ row)) / 0.2
            total += -float(log_softmax_ref(logits)[0])
        ces.append(total / B)
    a, b_ = cfg.recipe.loss_weights
    assert loss.item() == pytest.approx(a * ces[0] + b_ * sum(ces[1:]) / len(ces[1:]), rel=1e-5)
    if "baseline" in config:
        assert loss.item() == pytest.approx(sum(ces) / len(ces), rel=1e-5)
    # key from global 1 only; queries are global 2 + locals
    assert m.encoder_k.calls == [[views[0].shape]]
    assert m.encoder_q.calls == [[v.shape for v in views[1:]]]
    # keys written at L-2, L-1, 0, 1; pointer wrapped
    cols = [(L - 2 + j) % L for j in range(B)]
    torch.testing.assert_close(m.queue[:, cols].double(), k.t(), rtol=1e-6, atol=1e-6)
    assert int(m.queue_ptr) == 2
    torch.testing.assert_close(m.queue[:, 2:L - 2], queue0[:, 2:L - 2])
