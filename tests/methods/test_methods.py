"""Methods end to end on tiny inputs: every config trains a step; EMA, freezing, multi-crop
grouping, probe inputs, resume state, and a distributed (gloo) run of the all-reduced parts."""
from __future__ import annotations

import copy
import glob
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sslight_dali.methods import build_method, build_schedules
from sslight_dali.methods.swav import distributed_sinkhorn
from sslight_dali.models import build_backbone, sync_batchnorm
from sslight_dali.optim import build_optimizer
from sslight_dali.run_config import load_config

B = 4
TINY = ["recipe.global.size=32", "recipe.local.size=16", "dino.out_dim=64", "dino.hidden_dim=32",
        "dino.bottleneck_dim=16", "swav.num_prototypes=32", "swav.hidden_dim=32", "moco.queue_length=64",
        "moco.hidden_dim=32", f"train.batch_size={B}"]
CONFIGS = sorted(glob.glob("configs/*/*.yaml"))


def views_for(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = cfg.recipe
    return ([torch.randn(B, 3, r.global_.size, r.global_.size, generator=g) for _ in range(r.global_.count)]
            + [torch.randn(B, 3, r.local.size, r.local.size, generator=g) for _ in range(r.local.count)])


def tiny(config, *extra):
    return load_config(config, TINY + list(extra))


def test_twenty_configs():
    assert len(CONFIGS) == 20


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p[len("configs/"):-len(".yaml")])
def test_config_builds_and_trains_one_step(config):
    torch.manual_seed(0)
    cfg = tiny(config, "swav.epoch_queue_starts=0")
    m = build_method(cfg, 10)
    opt = build_optimizer(cfg, m)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.1, 1e-6 * g["wd_factor"]
    m.train()
    m.on_epoch_start(0)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    loss, metrics = m(views_for(cfg), torch.randint(0, 10, (B,)), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"ssl_loss", "gg_loss", "gl_loss", "probe_loss", "probe_acc"} <= set(metrics)
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())
    opt.zero_grad()
    loss.backward()
    m.after_backward(1)
    opt.step()
    m.after_step(0, momentum=0.996)
    changed = [n for n, p in m.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("probe") for n in changed) and len(changed) > len(before) // 2
    assert m.backbone(views_for(cfg)[0]).shape == (B, m.backbone.num_features)


def test_backbones_reference_settings():
    r = build_backbone("resnet18")
    assert all(float(blk.bn2.weight.detach().min()) == 1.0 for blk in r.layer1)  # zero_init_last=False
    mnv2 = build_backbone("mobilenetv2_100")
    dw = mnv2.blocks[1][0].conv_dw.weight  # torch kaiming fan_out = C*k*k (groups ignored)
    assert dw.std().item() == pytest.approx((2 / (dw.shape[0] * 9)) ** 0.5, rel=0.2)
    vit = build_backbone("vit_tiny_patch16_224", 0.1)
    assert vit(torch.randn(2, 3, 96, 96)).shape == (2, 192)  # local crops: dynamic size
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert 0.01 < vit.cls_token.std().item() < 0.03  # trunc_normal(0.02), not timm's 1e-6


def test_dino_teacher_without_drop_path_and_multicrop_grouping():
    cfg = tiny("configs/dino/vit_tiny_sslight.yaml")
    m = build_method(cfg, 0)
    assert m.teacher.backbone.blocks[-1].drop_path1.__class__ is nn.Identity
    assert m.student.backbone.blocks[-1].drop_path1.drop_prob > 0
    for ps, pt in zip(m.student.parameters(), m.teacher.parameters()):
        assert torch.equal(ps, pt) and not pt.requires_grad
    seen = {"student": [], "teacher": [], "head": []}
    m.student.backbone.register_forward_hook(lambda mod, i, o: seen["student"].append(tuple(i[0].shape)))
    m.teacher.backbone.register_forward_hook(lambda mod, i, o: seen["teacher"].append(tuple(i[0].shape)))
    m.student.head.register_forward_hook(lambda mod, i, o: seen["head"].append(tuple(i[0].shape)))
    m(views_for(cfg), None, 0)
    n_loc = cfg.recipe.local.count
    assert seen["student"] == [(2 * B, 3, 32, 32), (n_loc * B, 3, 16, 16)]  # one pass per resolution
    assert seen["teacher"] == [(2 * B, 3, 32, 32)]
    assert seen["head"] == [((2 + n_loc) * B, 192)]  # one head pass on all crops


def test_dino_ema_parameters_only_and_last_layer_freeze():
    torch.manual_seed(0)
    cfg = tiny("configs/dino/resnet18_sslight.yaml")
    m = build_method(cfg, 10)
    m(views_for(cfg), torch.zeros(B, dtype=torch.long), 0)  # BN stats move in both networks
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    t_before = copy.deepcopy(m.teacher.state_dict())
    m.after_step(0, momentum=0.75)
    s_params = dict(m.student.named_parameters())
    for name, t in m.teacher.named_parameters():
        torch.testing.assert_close(t, 0.75 * t_before[name] + 0.25 * s_params[name])
    for name, buf in m.teacher.named_buffers():
        assert torch.equal(buf, t_before[name]), name  # running stats untouched by the EMA

    loss, _ = m(views_for(cfg), torch.zeros(B, dtype=torch.long), 0)
    loss.backward()
    last = m.student.head.last_layer.weight_v
    assert last.grad is not None
    m.after_backward(1)  # epoch 1: no freeze
    assert last.grad is not None
    m.after_backward(0)  # epoch 0: frozen
    assert last.grad is None and m.student.head.mlp[0].weight.grad is not None


def test_swav_prototype_freeze_and_renormalisation():
    cfg = tiny("configs/swav/mobilenetv2_sslight.yaml")
    m = build_method(cfg, 0)
    protos = m.network.head.prototypes.weight
    loss, _ = m(views_for(cfg), None, 0)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(protos.shape[0]))
    loss.backward()
    m.after_backward(1)
    assert protos.grad is not None
    m.after_backward(0)
    assert protos.grad is None and m.network.head.projection[0].weight.grad is not None
    assert 0.008 < m.network.head.projection[0].weight.std().item() < 0.012  # N(0, 0.01) re-init


def test_moco_key_encoder_follows_by_its_momentum_schedule_after_the_step():
    # The momentum logged (the `momentum` schedule: moco.momentum at every step) is the one applied,
    # once per step after the optimizer step; the forward leaves the key encoder alone.
    cfg = tiny("configs/moco/mobilenetv2_sslight.yaml", "moco.momentum=0.99")
    m = build_method(cfg, 0)
    np.testing.assert_array_equal(build_schedules(cfg, 5, 1024)["momentum"], np.full(cfg.train.epochs * 5, 0.99))
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(1.0)
    k0 = [p.clone() for p in m.encoder_k.parameters()]
    q = [p.clone() for p in m.encoder_q.parameters()]
    m(views_for(cfg), None, 0)
    for k, kb in zip(m.encoder_k.parameters(), k0):
        assert torch.equal(k, kb)
    m.after_step(0, momentum=0.5)  # the schedule's value at the step
    for k, kb, qp in zip(m.encoder_k.parameters(), k0, q):
        torch.testing.assert_close(k, 0.5 * kb + 0.5 * qp)


@pytest.mark.parametrize("config,crop", [("configs/dino/resnet18_sslight.yaml", 0),
                                         ("configs/swav/mobilenetv2_sslight.yaml", 0),
                                         ("configs/moco/resnet18_sslight.yaml", 1)])
def test_probe_sees_first_student_crop_detached(config, crop):
    cfg = tiny(config)
    m = build_method(cfg, 10).eval()  # eval BN: features do not depend on batching
    seen = []
    m.probe.register_forward_hook(lambda mod, i, o: seen.append(i[0]))
    views = views_for(cfg)
    loss, metrics = m(views, torch.zeros(B, dtype=torch.long), 0)
    assert not seen[0].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(seen[0], m.backbone(views[crop]), rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(float(metrics["ssl_loss"] + metrics["probe_loss"]), rel=1e-6)


@pytest.mark.parametrize("config", ["configs/dino/resnet18_sslight.yaml",
                                    "configs/swav/resnet18_sslight.yaml",
                                    "configs/moco/resnet18_sslight.yaml"])
def test_state_dict_resumes_everything(config):
    torch.manual_seed(0)
    cfg = tiny(config, "swav.queue_length=8", "swav.epoch_queue_starts=0")
    a = build_method(cfg, 10)
    a.on_epoch_start(0)
    for step in range(3):  # moves the center, fills the SwAV queue, advances the MoCo pointer
        a(views_for(cfg, step), torch.zeros(B, dtype=torch.long), 0)
    keys = set(a.state_dict())
    expect = {"dino": {"center", "teacher.head.last_layer.weight_v", "probe.weight"},
              "swav": {"queue", "queue_filled", "probe.weight"},
              "moco": {"queue", "queue_ptr", "encoder_k.head.0.weight", "probe.weight"}}[cfg.method]
    assert expect <= keys
    torch.manual_seed(1)
    b = build_method(cfg, 10)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    if cfg.method == "swav":
        assert b.filled == a.filled == 8 and b.queue_in_use()
    torch.manual_seed(2)
    la, _ = a(views_for(cfg, 9), None, 0)
    torch.manual_seed(2)
    lb, _ = b(views_for(cfg, 9), None, 0)
    assert la.item() == lb.item()


def test_short_optimisation_reduces_loss():
    """DINO on a fixed batch with the real LARS, reference peak LR and teacher EMA: the loss
    falls at every step (the student is pulled toward the slowly moving teacher)."""
    torch.manual_seed(0)
    cfg = tiny("configs/dino/resnet18_sslight.yaml", "recipe.local.count=2", "train.epochs=1",
               "optim.warmup_epochs=0", "dino.freeze_last_layer_epochs=0")
    m = build_method(cfg, 0)
    opt = build_optimizer(cfg, m)
    steps = 5
    s = build_schedules(cfg, steps, 1024)  # constant-ish peak 1.92 over 5 steps
    views = views_for(cfg)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = s["lr"][step], s["wd"][step] * g["wd_factor"]
        loss, _ = m(views, None, 0)
        opt.zero_grad()
        loss.backward()
        m.after_backward(0)
        opt.step()
        m.after_step(step, momentum=s["momentum"][step])
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.6 * losses[0], losses


# ------------------------------------------------------------------------------ distributed
def _dist_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        scores = torch.randn(8, 6).clamp(-1, 1)
        q = distributed_sinkhorn(scores[rank * 4:(rank + 1) * 4], 0.05, 3)
        cfg = tiny("configs/moco/resnet18_sslight.yaml", "recipe.local.count=1")
        m = build_method(cfg, 0)
        torch.manual_seed(10 + rank)  # different keys per rank
        m.enqueue(torch.randn(B, cfg.moco.out_dim))
        dcfg = tiny("configs/dino/resnet18_sslight.yaml")
        d = build_method(dcfg, 0)
        d.update_center(torch.full((2 * B, dcfg.dino.out_dim), float(rank)))
        results[rank] = (q, m.queue[:, :2 * B].clone(), int(m.queue_ptr), d.center.clone())
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_sinkhorn_queue_center():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_dist_worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world)
    torch.manual_seed(0)
    scores = torch.randn(8, 6).clamp(-1, 1)
    whole = distributed_sinkhorn(scores, 0.05, 3)  # one process over the global batch
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), whole)
    torch.testing.assert_close(results[0][1], results[1][1])  # same queue on every rank
    assert results[0][2] == results[1][2] == 2 * B
    for r in range(world):
        torch.testing.assert_close(results[r][3], torch.full_like(results[r][3], 0.1 * 0.5))


@pytest.mark.parametrize("config", ["configs/dino/resnet18_sslight.yaml", "configs/swav/resnet18_sslight.yaml",
                                    "configs/moco/resnet18_sslight.yaml"])
def test_bf16_autocast_channels_last_keeps_losses_fp32(config):
    cfg = tiny(config, "recipe.local.count=2", "swav.queue_length=8", "swav.epoch_queue_starts=0")
    m = build_method(cfg, 10).to(memory_format=torch.channels_last)
    m.on_epoch_start(0)
    views = [v.contiguous(memory_format=torch.channels_last) for v in views_for(cfg)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = m(views, torch.zeros(B, dtype=torch.long), 0)
    assert loss.dtype == torch.float32 and metrics["ssl_loss"].dtype == torch.float32
    loss.backward()
    for name in ("center", "queue"):
        if hasattr(m, name):
            assert getattr(m, name).dtype == torch.float32


@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18"])
def test_sync_batchnorm_keeps_every_layer_and_its_activation(name):
    # Multi-GPU runs convert BN to SyncBatchNorm. In eval mode (running statistics, no process group)
    # a SyncBatchNorm computes what the BN it replaced did, so the converted network must give the same
    # features with the same keys. torch's own converter fails this on MobileNetV2 (its ReLU6s live
    # inside timm's BatchNormAct2d and are dropped).
    torch.manual_seed(0)
    model = build_backbone(name)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64) * 2 + 0.5)  # running statistics away from (0, 1)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    synced = sync_batchnorm(copy.deepcopy(model)).eval()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn > 0
    assert synced.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(synced(x), model(x))
