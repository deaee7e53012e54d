"""A new method is one module: this file defines a small BYOL-like method (config section, head, loss,
teacher momentum, resume keys, parameter-group rule), registers it, and trains it with the real
trainer, configs, checkpoints and resume, without any other file knowing about it."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslight_dali import checkpoint as ckpt
from sslight_dali.config import Config, ConfigError, dump_config, load_config, setting
from sslight_dali.methods import METHODS, MomentumTeacher, build_method, register_method
from sslight_dali.methods.common import MultiCropNet, build_mlp, lambdas_weighting, momentum_copy
from sslight_dali.models import build_backbone
from sslight_dali.optim import cosine_schedule, param_groups
from sslight_dali.pretrained import load_pretrained
from sslight_dali.train import train


@dataclass
class TinyByolCfg:
    dim: int = setting(16, 1)
    momentum_teacher: float = setting(0.9, 0.0, 1.0)
    momentum_teacher_end: float = setting(1.0, 0.0, 1.0)


class TinyByol(MomentumTeacher):
    """Student crops predict the teacher's projection of the other global crop (2 - 2 cos)."""
    resume_keys = ("dim",)
    backbone_keys = {"student": "student.backbone.", "teacher": "teacher.backbone."}

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.recipe.global_.count != 2:
            raise ConfigError("recipe.global.count: tiny_byol uses exactly 2 global views")

    def __init__(self, cfg, num_classes: int):
        backbone = build_backbone(cfg.model.backbone)
        super().__init__(cfg, num_classes, backbone.num_features)
        dim = cfg.tiny_byol.dim
        self.student = MultiCropNet(backbone, build_mlp(backbone.num_features, dim, dim, 2, True, nn.ReLU))
        self.teacher = momentum_copy(self.student, cfg.model.backbone)
        self.predictor = nn.Linear(dim, dim)

    @property
    def backbone(self) -> nn.Module:
        return self.student.backbone

    def param_group(self, name: str, p: torch.Tensor) -> str:
        return "not_regularized" if name.startswith("predictor.") else super().param_group(name, p)

    def ssl_forward(self, views, epoch):
        bs = views[0].shape[0]
        with torch.no_grad():
            targets = F.normalize(self.teacher(views[:2])[1], dim=-1).chunk(2)
        feats, z = self.student(views)
        preds = F.normalize(self.predictor(z), dim=-1).chunk(len(views))
        gg, gl = [], []
        for t, target in enumerate(targets):
            for v, pred in enumerate(preds):
                if v != t:
                    (gg if v < 2 else gl).append((2 - 2 * (pred * target).sum(-1)).mean())
        loss, gg_mean, gl_mean = lambdas_weighting(gg, gl, self.lambdas)
        return loss, dict(gg_loss=gg_mean.detach(), gl_loss=gl_mean.detach()), feats[:bs]


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Register for this file's tests only (a module-level decorator, as a method module uses, would
    run at collection and leave the section in every other test's configs, including those handed to
    spawned processes that never import this file)."""
    register_method("tiny_byol", config=TinyByolCfg)(TinyByol)
    yield
    METHODS.pop("tiny_byol")


TINY = ["method=tiny_byol", "tiny_byol.dim=8", "recipe.global.size=32", "recipe.local.size=16",
        "recipe.local.count=2", "train.batch_size=4", "data.num_threads=1", "train.knn_every=0",
        "train.log_every=1", "train.device=cpu", "data.device=cpu", "train.tensorboard=false"]


def tiny_cfg(data_root, out, *extra):
    return load_config("configs/dino/resnet18_sslight.yaml",
                       TINY + [f"data.root={data_root}", f"train.output_dir={out}", *extra])


def test_registration_adds_the_config_section_and_choice():
    assert METHODS["tiny_byol"] is TinyByol and TinyByol.name == "tiny_byol"
    assert Config().tiny_byol == TinyByolCfg()
    cfg = load_config(None, ["method=tiny_byol", "tiny_byol.dim=32"])
    assert cfg.tiny_byol.dim == 32 and isinstance(cfg, Config)
    shown = dump_config(cfg)
    assert "tiny_byol:\n  dim: 32" in shown and "\ndino:" not in shown
    with pytest.raises(ConfigError, match=r"tiny_byol\.dimm.*tiny_byol\.dim"):
        load_config(None, ["tiny_byol.dimm=3"])
    with pytest.raises(ConfigError, match=r"tiny_byol\.dim: 0 is out of range"):
        load_config(None, ["tiny_byol.dim=0"])
    with pytest.raises(ConfigError, match="recipe.global.count: tiny_byol"):
        load_config(None, ["method=tiny_byol", "recipe.global.count=3", "recipe.global.blur_p=0.5",
                               "recipe.global.solarize_p=0.0"])
    with pytest.raises(ConfigError, match="tiny_byol"):  # listed among the choices
        load_config(None, ["method=byol"])
    with pytest.raises(ValueError, match="already registered"):
        register_method("tiny_byol", config=TinyByolCfg)(type("Other", (TinyByol,), {}))
    with pytest.raises(ValueError, match="not one of"):
        register_method("optim", config=TinyByolCfg)
    assert "optim" not in METHODS


def test_optimizer_groups_and_schedules_come_from_the_method():
    cfg = load_config(None, TINY)
    m = build_method(cfg, 0)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(m)}
    assert {id(m.predictor.weight), id(m.predictor.bias)} <= groups["not_regularized"]
    assert id(m.student.head[0].weight) in groups["regularized"]
    s = TinyByol.schedules(cfg, 5)
    np.testing.assert_array_equal(s["momentum"], cosine_schedule(0.9, 1.0, cfg.train.epochs, 5))


def test_new_method_trains_checkpoints_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_cfg(tiny_data, out, "train.max_steps=3"))
    assert result["steps"] == 3
    recs = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["ssl_loss"] <= 4.0 for r in recs)
    spe = 32 // 4
    expected = cosine_schedule(0.9, 1.0, 200, spe)
    assert [r["momentum"] for r in recs] == pytest.approx(list(expected[:3]))  # the method's schedule, logged
    saved = (out / "config.yaml").read_text()
    assert "tiny_byol:\n  dim: 8" in saved and "\ndino:" not in saved
    state = ckpt.load(out / "checkpoint.pt")
    # the teacher moved by EMA (momentum 0.9...) toward a student that moved by gradient steps
    s, t = state["model"]["student.head.0.weight"], state["model"]["teacher.head.0.weight"]
    assert not torch.equal(s, t)
    # the checkpoint rebuilds: the backbone through backbone_keys, the run by resuming
    pre = load_pretrained(out / "checkpoint.pt", "teacher")
    assert torch.equal(pre.backbone.state_dict()["conv1.weight"], state["model"]["teacher.backbone.conv1.weight"])
    assert train(tiny_cfg(tiny_data, out, "train.max_steps=4", "resume=auto"))["steps"] == 4
    with pytest.raises(ckpt.CheckpointError, match="tiny_byol.dim is 8 in the checkpoint but 16 now"):
        train(tiny_cfg(tiny_data, out, "train.max_steps=5", "resume=auto", "tiny_byol.dim=16"))
