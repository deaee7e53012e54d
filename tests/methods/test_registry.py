"""A new method is one module: this file defines a small BYOL-like method (config section and its Config
subclass, head, loss, teacher momentum, resume keys, parameter-group rule), registers it, and trains it
with the real trainer, configs, checkpoints and resume, without any other file knowing about it.
test_where_a_change_goes.py adds one to a copy of the package as README says."""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslight_dali import checkpoint as ckpt
from sslight_dali.config import Config, ConfigError, dump_config, setting
from sslight_dali.run_config import load_config
from sslight_dali.methods import METHODS, MomentumTeacher, build_method, register_method
from sslight_dali.methods.common import MultiCropNet, build_mlp, feature_dim, lambdas_weighting, momentum_copy
from sslight_dali.models import build_backbone
from sslight_dali.optim import cosine_schedule, param_groups
from sslight_dali.pretrained import load_pretrained
from sslight_dali.train import train

REPO = Path(__file__).resolve().parents[2]


@dataclass
class TinyByolCfg:
    dim: int = setting(16, 1)
    momentum_teacher: float = setting(0.9, 0.0, 1.0)
    momentum_teacher_end: float = setting(1.0, 0.0, 1.0)


@dataclass
class TinyByolConfig(Config):
    method: str = "tiny_byol"
    tiny_byol: TinyByolCfg = field(default_factory=TinyByolCfg)


class TinyByol(MomentumTeacher[TinyByolConfig]):
    """Student crops predict the teacher's projection of the other global crop (2 - 2 cos)."""
    global_views = 2
    resume_keys = ("dim",)
    backbone_keys = {"student": "student.backbone.", "teacher": "teacher.backbone."}

    @classmethod
    def momentum_range(cls, cfg: TinyByolConfig) -> tuple[float, float]:
        return cfg.tiny_byol.momentum_teacher, cfg.tiny_byol.momentum_teacher_end

    def __init__(self, cfg: TinyByolConfig, num_classes: int):
        backbone = build_backbone(cfg.model.backbone)
        super().__init__(cfg, num_classes, feature_dim(backbone))
        dim = cfg.tiny_byol.dim
        self.student = MultiCropNet(backbone, build_mlp(feature_dim(backbone), dim, dim, 2, True, nn.ReLU))
        self.teacher = momentum_copy(self.student, cfg.model.backbone)
        self.predictor = nn.Linear(dim, dim)

    @property
    def backbone(self) -> nn.Module:
        return self.student.backbone

    def ema_pair(self) -> tuple[nn.Module, nn.Module]:
        return self.teacher, self.student

    def param_group(self, name: str, p: torch.Tensor) -> str:
        return "not_regularized" if name.startswith("predictor.") else super().param_group(name, p)

    def ssl_forward(self, views, epoch):
        bs = views[0].shape[0]
        with torch.no_grad():
            targets = F.normalize(self.teacher(views[:2])[1], dim=-1).chunk(2)
        feats, z = self.student(views)
        preds = F.normalize(self.predictor(z), dim=-1).chunk(len(views))
        gg: list[torch.Tensor] = []
        gl: list[torch.Tensor] = []
        for t, target in enumerate(targets):
            for v, pred in enumerate(preds):
                if v != t:
                    (gg if v < 2 else gl).append((2 - 2 * (pred * target).sum(-1)).mean())
        loss, gg_mean, gl_mean = lambdas_weighting(gg, gl, self.lambdas)
        return loss, dict(gg_loss=gg_mean.detach(), gl_loss=gl_mean.detach()), feats[:bs]


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Register for this file's tests only (a module-level decorator, as a method module uses, would
    run at collection and make `tiny_byol` a valid key in every other test's configs, including those
    handed to spawned processes that never import this file)."""
    register_method("tiny_byol", config=TinyByolConfig)(TinyByol)
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
    assert TinyByolConfig().tiny_byol == TinyByolCfg()
    cfg = load_config(None, ["method=tiny_byol", "tiny_byol.dim=32"])
    assert cfg.tiny_byol.dim == 32 and isinstance(cfg, TinyByolConfig) and isinstance(cfg, Config)
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
        register_method("tiny_byol", config=TinyByolConfig)(type("Other", (TinyByol,), {}))
    with pytest.raises(ValueError, match="not one of"):
        register_method("optim", config=TinyByolConfig)
    assert "optim" not in METHODS
    with pytest.raises(TypeError, match="adds the one section 'byol'"):  # the section must carry the name
        register_method("byol", config=TinyByolConfig)
    with pytest.raises(TypeError, match="subclass of Config"):  # a bare section is not a config
        register_method("tiny_byol2", config=TinyByolCfg)
    assert "byol" not in METHODS and "tiny_byol2" not in METHODS


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


# README, "Where a change goes": a new method is one module methods/<name>.py (section, Config subclass,
# the method registered with @register_method), its import in methods/__init__.py, and configs/<name>/.
# These are those edits for tiny_byol (the classes above, as a module of the package).
MODULE_HEADER = """\"\"\"tiny_byol: student crops predict the teacher's projection of the other global crop.\"\"\"
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..models import build_backbone
from ..settings import setting
from .common import MomentumTeacher, MultiCropNet, build_mlp, feature_dim, lambdas_weighting, momentum_copy
from .registry import register_method


"""
CONFIG_FILE = """method: tiny_byol
model:
  backbone: resnet18
data:
  recipe: cnn_sslight
train:
  output_dir: runs/tiny_byol_resnet18
tiny_byol:
  dim: 8
"""


def add_tiny_byol(repo) -> None:
    module = (MODULE_HEADER + inspect.getsource(TinyByolCfg) + "\n\n" + inspect.getsource(TinyByolConfig) + "\n\n"
              + '@register_method("tiny_byol", config=TinyByolConfig)\n' + inspect.getsource(TinyByol))
    (repo / "sslight_dali/methods/tiny_byol.py").write_text(module)
    init = repo / "sslight_dali/methods/__init__.py"
    last = "from .moco import MoCo\n"
    assert init.read_text().count(last) == 1
    init.write_text(init.read_text().replace(last, last + "from .tiny_byol import TinyByol\n"))
    (repo / "configs/tiny_byol").mkdir()
    (repo / "configs/tiny_byol/resnet18_tiny.yaml").write_text(CONFIG_FILE)


@pytest.mark.slow
def test_a_new_method_is_one_module_an_import_and_its_configs(package_copy, tiny_data):
    # tiny_byol added to a copy of the package as README says: `config show` and `train` take it by
    # name, from its own config file, and the type check covers its module.
    repo, run = package_copy
    add_tiny_byol(repo)
    shown = run("-m", "sslight_dali.cli", "config", "show", "tiny_byol/resnet18_tiny")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.startswith("method: tiny_byol\nmodel:\n") and "\ntiny_byol:\n  dim: 8\n" in shown.stdout
    assert "\ndino:" not in shown.stdout
    out = repo / "runs/t"
    trained = run("-m", "sslight_dali.cli", "train", "tiny_byol/resnet18_tiny", *TINY[1:], f"data.root={tiny_data}",
                  f"train.output_dir={out}", "train.max_steps=2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    recs = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["momentum"] == pytest.approx(0.9)
    typed = run("-m", "mypy", "--config-file", str(REPO / "mypy.ini"), "--cache-dir", str(REPO / ".mypy_cache"),
                "sslight_dali/methods")
    assert typed.returncode == 0 and "Success" in typed.stdout, typed.stdout[-3000:]
