"""Schedules, LARS and parameter groups against the reference's numbers (saic-fi/SSLight
src/sslight/utils/{optimizer,scheduler,param_utils}.py and src/sslight/engine/trainer.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sslight_dali.methods import build_method, build_schedules
from sslight_dali.methods.dino import teacher_temp_schedule
from sslight_dali.models import build_backbone
from sslight_dali.optim import LARS, build_optimizer, cosine_schedule, global_batch_size, param_groups
from sslight_dali.run_config import load_config

IPE = 1251  # ImageNet iterations per epoch at a global batch of 1024 (drop_last)


def sched(config, batch=1024):
    return build_schedules(load_config(config), IPE, batch)


# ------------------------------------------------------------------------------------ schedules
def test_cosine_schedule_formula():
    s = cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=5, warmup_epochs=1, start_warmup=0.2)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], [0.2, 0.4, 0.6, 0.8, 1.0])  # linspace, base included
    t = np.arange(15)
    np.testing.assert_allclose(s[5:], 0.1 + 0.45 * (1 + np.cos(np.pi * t / 15)))
    assert s[5] == 1.0 and s[-1] > 0.1


def test_dino_cnn_schedule_reference_values():
    s = sched("configs/dino/resnet18_sslight.yaml")
    assert all(len(v) == 200 * IPE == 250200 for v in s.values())
    lr = s["lr"]
    assert lr[0] == 0.0
    assert lr[12509] == pytest.approx(1.92)  # last warmup step reaches the peak 0.48 * 1024 / 256
    assert lr[12510] == pytest.approx(1.92)  # cosine starts at the peak
    assert lr[12510 + 237690 // 2] == pytest.approx(0.0048 + 0.5 * (1.92 - 0.0048))
    assert 0.0048 < lr[-1] < 0.0048 + 1e-9
    np.testing.assert_allclose(s["wd"][[0, 12510, 250199]], 1e-6)  # constant 1e-6 -> 1e-6
    mm = s["momentum"]
    assert mm[0] == pytest.approx(0.996) and mm[125100] == pytest.approx(0.998)
    assert 0.99999 < mm[-1] < 1.0


def test_swav_and_vit_schedule_reference_values():
    s = sched("configs/swav/mobilenetv2_sslight.yaml")
    assert s["lr"][0] == pytest.approx(0.075)  # START_WARMUP is absolute
    assert s["lr"][12509] == pytest.approx(1.2)
    v = sched("configs/dino/vit_tiny_sslight.yaml")
    assert v["lr"][12509] == pytest.approx(0.002)
    assert 1e-5 < v["lr"][-1] < 1.0001e-5
    assert v["wd"][0] == pytest.approx(0.04) and v["wd"][125100] == pytest.approx(0.22)
    assert v["wd"][-1] == pytest.approx(0.4, rel=1e-6)


def test_global_batch_uses_reference_world_size():
    cfg = load_config("configs/dino/resnet18_sslight.yaml", ["train.reference_world_size=8"])
    assert global_batch_size(cfg, world_size=1) == 1024
    cfg = load_config("configs/dino/resnet18_sslight.yaml", ["train.batch_size=256"])
    assert global_batch_size(cfg, world_size=2) == 512


def test_teacher_temperature_per_epoch():
    cnn = teacher_temp_schedule(load_config("configs/dino/resnet18_sslight.yaml").dino, 200)
    assert cnn[0] == pytest.approx(0.04)
    assert cnn[25] == pytest.approx(0.04 + 0.03 * 25 / 49)  # linspace over 50 epochs
    assert cnn[49] == pytest.approx(0.07)
    assert cnn[50] == pytest.approx(0.07) and cnn[100] == pytest.approx(0.07)
    vit = teacher_temp_schedule(load_config("configs/dino/vit_tiny_sslight.yaml").dino, 200)
    assert vit[29] == pytest.approx(0.07) and vit[30] == pytest.approx(0.07)
    assert vit[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert len(cnn) == len(vit) == 200


# ------------------------------------------------------------------------------------------ LARS
def lars_reference(p, grads, lr, wd, momentum, eta, exclude):
    """Plain-Python LARS on a flat list of floats."""
    p, mu = list(p), [0.0] * len(p)
    for g in grads:
        dp = [gi + wd * pi for gi, pi in zip(g, p)]
        if not exclude:
            pn, dn = math.sqrt(sum(x * x for x in p)), math.sqrt(sum(x * x for x in dp))
            if pn > 0 and dn > 0:
                dp = [x * eta * pn / dn for x in dp]
        mu = [momentum * m + d for m, d in zip(mu, dp)]
        p = [pi - lr * m for pi, m in zip(p, mu)]
    return p


def test_lars_two_steps_against_hand_computation():
    w = nn.Parameter(torch.tensor([[1.0, 2.0], [2.0, 0.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    z = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))  # |p| = 0: no adaptation
    quiet = nn.Parameter(torch.ones(3, dtype=torch.float64) * 0.0 + 1.0)
    opt = LARS([dict(params=[w, z], lars_exclude=False, weight_decay=0.1),
                dict(params=[b], lars_exclude=True, weight_decay=0.0),
                dict(params=[quiet], lars_exclude=False, weight_decay=0.0)],
               lr=0.5, momentum=0.9, eta=0.02)
    grads = {w: [[0.3, -0.1, 0.2, 0.4], [-0.5, 0.1, 0.0, 0.2]], z: [[1.0, 0.0, 0.0, 2.0], [0.5, 0.5, 0.0, 0.0]],
             b: [[0.2, 0.1], [-0.3, 0.6]], quiet: [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]}  # |dp| = 0
    start = {p: p.detach().flatten().tolist() for p in grads}
    for step in range(2):
        for p, g in grads.items():
            p.grad = torch.tensor(g[step], dtype=torch.float64).view_as(p)
        opt.step()
    for p, wd, excl in ((w, 0.1, False), (z, 0.1, False), (b, 0.0, True), (quiet, 0.0, False)):
        want = lars_reference(start[p], grads[p], 0.5, wd, 0.9, 0.02, excl)
        np.testing.assert_allclose(p.detach().flatten().numpy(), want, rtol=1e-12, atol=1e-15)
    # the adapted update really is scaled (not the plain momentum-SGD step)
    plain = lars_reference(start[w], grads[w], 0.5, 0.1, 0.9, 0.02, True)
    assert not np.allclose(w.detach().flatten().numpy(), plain)


def test_lars_skips_params_without_grad():
    p = nn.Parameter(torch.ones(3))
    opt = LARS([p], lr=1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state


# ------------------------------------------------------------------------------------ grouping
def groups_by_name(model):
    return {g["name"]: g for g in param_groups(model)}


def test_param_groups_mobilenetv2():
    g = groups_by_name(build_backbone("mobilenetv2_100"))
    assert len(g["regularized_dw"]["params"]) == 17  # one depthwise conv per inverted residual
    assert all(p.ndim == 4 and p.shape[1] == 1 for p in g["regularized_dw"]["params"])
    assert all(p.ndim == 1 for p in g["not_regularized"]["params"])
    assert all(p.ndim >= 2 for p in g["regularized"]["params"])
    assert (g["regularized"]["wd_factor"], g["regularized"]["lars_exclude"]) == (1.0, False)
    assert (g["regularized_dw"]["wd_factor"], g["regularized_dw"]["lars_exclude"]) == (0.0, False)
    assert (g["not_regularized"]["wd_factor"], g["not_regularized"]["lars_exclude"]) == (0.0, True)


def test_param_groups_resnet_and_vit():
    r = groups_by_name(build_backbone("resnet18"))
    assert set(r) == {"regularized", "not_regularized"}  # no depthwise convs
    vit = build_backbone("vit_tiny_patch16_224")
    v = groups_by_name(vit)
    reg = {id(p) for p in v["regularized"]["params"]}
    assert id(vit.pos_embed) in reg and id(vit.cls_token) in reg
    assert all(p.ndim == 1 for p in v["not_regularized"]["params"])


TINY = ["dino.out_dim=16", "dino.hidden_dim=8", "dino.bottleneck_dim=4", "moco.queue_length=8",
        "moco.hidden_dim=8"]


def test_param_groups_exclude_teacher_and_handle_weight_g():
    cnn = build_method(load_config("configs/dino/resnet18_sslight.yaml", TINY), 10)
    grouped = {id(p) for g in param_groups(cnn) for p in g["params"]}
    trainable = {id(p) for p in cnn.student.parameters() if p.requires_grad} | {id(p) for p in cnn.probe.parameters()}
    assert grouped == trainable
    assert not grouped & {id(p) for p in cnn.teacher.parameters()}
    assert id(cnn.student.head.last_layer.weight_g) not in grouped  # norm_last_layer: frozen g
    vit = build_method(load_config("configs/dino/vit_tiny_sslight.yaml", TINY), 10)
    reg = {id(p) for p in groups_by_name(vit)["regularized"]["params"]}
    assert id(vit.student.head.last_layer.weight_g) in reg  # trainable and decayed for ViT
    moco = build_method(load_config("configs/moco/mobilenetv2_sslight.yaml", TINY), 10)
    grouped = {id(p) for g in param_groups(moco) for p in g["params"]}
    assert not grouped & {id(p) for p in moco.encoder_k.parameters()}


def test_build_optimizer_kinds():
    lars = build_optimizer(load_config("configs/dino/resnet18_sslight.yaml", TINY),
                           build_method(load_config("configs/dino/resnet18_sslight.yaml", TINY), 10))
    assert isinstance(lars, LARS)
    assert lars.param_groups[0]["eta"] == 0.001 and lars.param_groups[0]["momentum"] == 0.9
    cfg = load_config("configs/dino/vit_tiny_sslight.yaml", TINY)
    adamw = build_optimizer(cfg, build_method(cfg, 10))
    assert isinstance(adamw, torch.optim.AdamW)
    assert all("wd_factor" in g and "lars_exclude" in g for g in adamw.param_groups)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.999) and adamw.param_groups[0]["eps"] == 1e-8
