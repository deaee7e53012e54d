"""`sslight import-reference` on files laid out exactly as the reference's trainer writes them.

The reference (src/sslight/engine/trainer.py, save_checkpoint) torch.saves
  {"config": fvcore CfgNode, "epoch", "steps", "state_dict": DDP model state ("module." keys),
   "optimizer": its state_dict, "loss": DINOLoss state (DINO only), "fp16_scaler": GradScaler state}
as <METHOD>_<ARCH>_last_ckpt.pth.tar, and SwAV also OUTPUT_DIR/queue<rank>.pth. The files here are
pickled with the real fvcore/yacs CfgNode classes; the config is built as the reference's main builds
it: defaults, the run's exp YAML merged from a file, then the command line (MODEL.BACKBONE_ARCH ...).
The view-sampling values are the reference's (spec §1.3), written here, not read from our configs.
"""
import io
import json
import os
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
import torchvision
import yacs.config
from fvcore.common.config import CfgNode
from torch import nn

from sslight_dali import checkpoint as ckpt
from sslight_dali.cli import main
from sslight_dali.pretrained import load_pretrained

# The reference's MULTI_VIEWS_TRANSFORMS per run (its exp YAMLs; spec §1.3): (global scale, local scale,
# local count, local size, LAMBDAS). SwAV and MoCo MobileNetV2 use the CNN values.
VIEWS = {
    ("cnn", "baseline"): ([0.14, 1.0], [0.05, 0.14], 6, 96, [0.142857, 0.857143]),
    ("cnn", "sslight"): ([0.3, 1.0], [0.05, 0.3], 6, 128, [0.4, 0.6]),
    ("vit", "baseline"): ([0.25, 1.0], [0.05, 0.25], 10, 96, [0.090909, 0.909091]),
    ("vit", "sslight"): ([0.3, 1.0], [0.05, 0.3], 10, 128, [0.4, 0.6]),
}
# (SSL_METHOD, MODEL.BACKBONE_ARCH): our method, backbone, config stem; the reference's student/teacher modules
RUNS = {
    ("DINO", "resnet18"): ("dino", "resnet18", "resnet18", "student", "teacher"),
    ("DINO", "resnet34"): ("dino", "resnet34", "resnet34", "student", "teacher"),
    ("DINO", "mobilenet_v2"): ("dino", "mobilenetv2_100", "mobilenetv2", "student", "teacher"),
    ("DINO", "vit_tiny"): ("dino", "vit_tiny_patch16_224", "vit_tiny", "student", "teacher"),
    ("SWAV", "mobilenet_v2"): ("swav", "mobilenetv2_100", "mobilenetv2", "network", None),
    ("MOCO", "mobilenet_v2"): ("moco", "mobilenetv2_100", "mobilenetv2", "encoder_q", "encoder_k"),
}


def run(*argv):
    return main([str(a) for a in argv])


def reference_config(tmp_path, method, arch, variant):
    """An fvcore CfgNode as the reference's main builds it: get_cfg() defaults (the sections that matter
    here), merge_from_file(exp YAML), merge_from_list(command line), WORLD_SIZE set by run_task."""
    cfg = CfgNode()
    cfg.TRAIN = CfgNode({"BATCH_SIZE": 128, "CHECKPOINT_PERIOD": 20, "JOINT_LINEAR_PROBE": False, "NUM_CLASSES": 1000})
    cfg.DATA = CfgNode({"PATH_TO_DATA_DIR": "datasets/imagenet_ori/", "MEAN": [0.485, 0.456, 0.406],
                        "STD": [0.229, 0.224, 0.225]})
    cfg.MULTI_VIEWS_TRANSFORMS = CfgNode({
        "GLOBAL_CROPS_SCALE": [0.25, 1.0], "LOCAL_CROPS_SCALE": [0.05, 0.25], "LOCAL_CROPS_NUMBER": 6,
        "LOCAL_CROP_SIZE": 96, "GLOBAL_CROP_SIZE": 224, "NMB_CROPS": [2, 6], "CROPS_FOR_ASSIGN": [0, 1],
        "GAUSSIAN_BLUR_PROB": [1.0, 0.1, 0.5], "SOLARIZATION_PROB": [0.0, 0.2], "LAMBDAS": [0.142857, 0.857143]})
    cfg.MODEL = CfgNode({"BACKBONE_ARCH": "vit_tiny", "MODEL_MOMENTUM": 0.99, "MODEL_MOMENTUM_END": 1.0})
    cfg.SOLVER = CfgNode({"OPTIMIZING_METHOD": "LARS", "BASE_LR": 0.3, "TOTAL_EPOCHS": 300, "WEIGHT_DECAY": 1e-6})
    cfg.SSL_METHOD, cfg.OUTPUT_DIR, cfg.WORLD_SIZE, cfg.USE_FP16 = "DINO", "./tmp", 1, False
    g, l, n, size, lambdas = VIEWS["vit" if arch == "vit_tiny" else "cnn", variant]
    exp = tmp_path / f"{method.lower()}_{variant}.yaml"
    exp.write_text(f"""MULTI_VIEWS_TRANSFORMS:
  GLOBAL_CROPS_SCALE: {g}
  LOCAL_CROPS_SCALE: {l}
  LOCAL_CROPS_NUMBER: {n}
  LOCAL_CROP_SIZE: {size}
  NMB_CROPS: [2, {n}]
  LAMBDAS: {lambdas}
MODEL:
  BACKBONE_ARCH: mobilenet_v2
SOLVER:
  OPTIMIZING_METHOD: {"AdamW" if arch == "vit_tiny" else "LARS"}
  TOTAL_EPOCHS: 200
SSL_METHOD: {method}
USE_FP16: True
""")
    cfg.merge_from_file(str(exp))
    cfg.merge_from_list(["MODEL.BACKBONE_ARCH", arch, "OUTPUT_DIR", "/out", "TRAIN.JOINT_LINEAR_PROBE", "True"])
    cfg.WORLD_SIZE = 8
    return cfg


@torch.no_grad()
def source_backbone(arch):
    """(the reference's backbone state dict, a model giving its pooled features): torchvision's ResNet /
    MobileNetV2 as the reference wraps them (`encoder` = the model minus avgpool/fc, or `features`), or
    DINO's ViT, whose names are timm's."""
    torch.manual_seed(0)
    if arch == "vit_tiny":
        model = timm.create_model("vit_tiny_patch16_224", num_classes=0)
        return model.state_dict(), model.eval()
    model = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34,
             "mobilenet_v2": torchvision.models.mobilenet_v2}[arch]()
    for m in model.modules():  # BN statistics away from (0, 1), so a mis-mapped buffer changes the output
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    if arch == "mobilenet_v2":
        sd = {"encoder." + k: v for k, v in model.features.state_dict().items()}
        model.classifier = nn.Identity()
    else:
        sd = {"encoder." + k: v for k, v in nn.Sequential(*list(model.children())[:-2]).state_dict().items()}
        model.fc = nn.Identity()
    return sd, model.eval()


def trainer_state(method, arch, backbone_sd):
    """What save_checkpoint stores besides the config: the DDP state dict (backbones, heads, classifier,
    MoCo queue), a real optimizer's state after a step (param_groups as the reference's get_params and
    LARS build them, LR and WD set from numpy schedules), DINO's loss center, the GradScaler state."""
    _, _, _, student, teacher = RUNS[method, arch]
    sd = OrderedDict()
    for prefix, noise in ((student, 0.0), (teacher, 0.01)):
        if prefix:
            sd.update({f"module.{prefix}.backbone.{k}": v + noise * torch.randn_like(v) if v.is_floating_point()
                       else v.clone() for k, v in backbone_sd.items()})
            sd[f"module.{prefix}.head.mlp.0.weight"] = torch.randn(16, 8)
            sd[f"module.{prefix}.head.last_layer.weight_g"] = torch.ones(32, 1)
    sd["module.classifier.weight"], sd["module.classifier.bias"] = torch.randn(1000, 8), torch.zeros(1000)
    if method == "MOCO":
        sd["module.queue"], sd["module.queue_ptr"] = torch.randn(128, 64), torch.zeros(1, dtype=torch.long)

    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))]
    groups = [{"params": params[:1]}, {"params": params[1:], "wd_factor": 0.0, "lars_exclude": True}]
    if arch == "vit_tiny":
        opt = torch.optim.AdamW(groups)
    else:  # LARS: SGD's state layout with LARS's extra defaults in each group
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        for g in opt.param_groups:
            g.update(eta=0.001, weight_decay_filter=None, lars_adaptation_filter=None)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = np.linspace(0, 0.48, 5)[3], np.float64(1e-6)
    state = {"state_dict": sd, "optimizer": opt.state_dict(),
             "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}
    if method == "DINO":
        loss = nn.Module()
        loss.register_buffer("center", torch.randn(1, 32))
        state["loss"] = loss.state_dict()
    return state


def write_trainer_checkpoint(run_dir, method, arch, variant):
    """<run>/checkpoints/<METHOD>_<ARCH>_last_ckpt.pth.tar as save_checkpoint writes it; returns (path, model)."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    backbone_sd, model = source_backbone(arch)
    state = {"config": reference_config(run_dir, method, arch, variant), "epoch": 200, "steps": 250200,
             **trainer_state(method, arch, backbone_sd)}
    path = run_dir / "checkpoints" / f"{method}_{arch}_last_ckpt.pth.tar"
    torch.save(state, path)
    return path, model


def plain(x):
    """True if x is nested dicts/lists of JSON scalars, with no class of the file's own (CfgNode, set, numpy)."""
    if type(x) is dict:
        return all(type(k) is str and plain(v) for k, v in x.items())
    if type(x) is list:
        return all(plain(v) for v in x)
    return type(x) in (str, int, float, bool, type(None))


@torch.no_grad()
def features(model, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model.eval()(x)


@pytest.mark.parametrize("variant", ["baseline", "sslight"])
@pytest.mark.parametrize("method,arch", list(RUNS))
def test_trainer_checkpoint_imports_with_the_variant_its_config_states(method, arch, variant, tmp_path, capsys):
    ours, backbone, stem, student, teacher = RUNS[method, arch]
    src, source = write_trainer_checkpoint(tmp_path / "run", method, arch, variant)
    assert "baseline" not in src.name and "sslight" not in src.name  # the name cannot decide it
    out = tmp_path / "imp.pt"
    assert run("import-reference", src, "--out", out) == 0
    captured = capsys.readouterr()
    g, l, n, size, lambdas = VIEWS["vit" if arch == "vit_tiny" else "cnn", variant]
    assert captured.err.strip() == (f"config {ours}/{stem}_{variant}: the file's reference config has global scale "
                                    f"({g[0]}, {g[1]}), local scale ({l[0]}, {l[1]}), {n} x {size} px locals, "
                                    f"LAMBDAS [{lambdas[0]}, {lambdas[1]}]")
    summary = json.loads(captured.out)
    assert summary["config"].endswith(f"configs/{ours}/{stem}_{variant}.yaml")
    assert summary["config_reason"].startswith("the file's reference config has global scale")
    assert set(summary["not_imported"]) == {"optimizer", "fp16_scaler"} | ({"loss"} if method == "DINO" else set())

    pre = load_pretrained(out)
    assert (pre.cfg.method, pre.cfg.model.backbone, pre.epoch, pre.step) == (ours, backbone, 200, 250200)
    r = pre.cfg.recipe  # the stored config samples views as the reference run did
    assert (r.global_.scale, r.local.scale, r.local.count, r.local.size, r.loss_weights) == (g, l, n, size, lambdas)
    px = 224 if arch == "vit_tiny" else 64
    torch.testing.assert_close(features(pre.backbone, px), features(source, px), atol=1e-5, rtol=0)

    kept = ckpt.load(out)["imported_from"]["reference_config"]
    assert plain(kept)
    assert kept["MULTI_VIEWS_TRANSFORMS"]["LAMBDAS"] == lambdas and kept["MODEL"]["BACKBONE_ARCH"] == arch
    assert (kept["SSL_METHOD"], kept["WORLD_SIZE"], kept["TRAIN"]["JOINT_LINEAR_PROBE"]) == (method, 8, True)


def test_the_file_is_a_real_fvcore_pickle(tmp_path):
    """The fixture is what the issue is about: torch's safe loader refuses it, and its config node
    carries a set in its pickled attributes."""
    src, _ = write_trainer_checkpoint(tmp_path, "DINO", "resnet18", "baseline")
    with pytest.raises(Exception, match="fvcore.common.config.CfgNode"):
        torch.load(src, weights_only=True)
    cfg = torch.load(src, weights_only=False)["config"]
    assert isinstance(cfg, yacs.config.CfgNode) and type(cfg).__module__ == "fvcore.common.config"
    assert isinstance(cfg.__dict__["__deprecated_keys__"], set)


def test_a_config_that_matches_neither_variant_needs_config(tmp_path, capsys):
    src, _ = write_trainer_checkpoint(tmp_path / "run", "DINO", "resnet18", "sslight")
    state = torch.load(src, weights_only=False)
    state["config"].MULTI_VIEWS_TRANSFORMS.LOCAL_CROP_SIZE = 112  # neither 96 nor 128
    torch.save(state, src)
    out = tmp_path / "imp.pt"
    assert run("import-reference", src, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and "6 x 112 px locals" in err
    assert "matches neither dino/resnet18_baseline nor dino/resnet18_sslight" in err and "--config" in err
    assert not out.exists()
    assert run("import-reference", src, "--out", out, "--config", "configs/dino/resnet18_baseline.yaml") == 0
    assert capsys.readouterr().err.strip() == "config configs/dino/resnet18_baseline.yaml: given with --config"
    assert load_pretrained(out).cfg.data.recipe.endswith("cnn_baseline.yaml")
    assert ckpt.load(out)["imported_from"]["config_reason"] == "given with --config"


def test_a_config_that_matches_both_variants_is_not_guessed(tmp_path, capsys, monkeypatch):
    import sslight_dali.export as export
    sslight = export.shipped_config("dino", "resnet18", "sslight")
    monkeypatch.setattr(export, "shipped_config", lambda method, backbone, variant: sslight)  # two equal variants
    src, _ = write_trainer_checkpoint(tmp_path / "run", "DINO", "resnet18", "sslight")
    assert run("import-reference", src, "--out", tmp_path / "imp.pt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matches both" in err and "--config" in err
    assert not (tmp_path / "imp.pt").exists()


def _nested(depth):
    x = []
    for _ in range(depth):
        x = [x, x]  # pickled once per level (the memo), 2**depth leaves when copied
    return x


def _looped():
    d = {"A": 1}
    d["SELF"] = d
    return d


@pytest.mark.parametrize("config,why", [(_looped, "contains itself"), (lambda: _nested(40), "over 100000 values")])
def test_a_config_built_to_explode_is_refused_in_one_line(config, why, tmp_path, capsys):
    src, _ = write_trainer_checkpoint(tmp_path / "run", "DINO", "resnet18", "sslight")
    state = torch.load(src, weights_only=False)
    state["config"] = config()
    assert len(__import__("pickle").dumps(state["config"])) < 1000  # a small file can hold it
    torch.save(state, src)
    assert run("import-reference", src, "--out", tmp_path / "imp.pt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and why in err
    assert not (tmp_path / "imp.pt").exists()


def test_without_a_config_the_file_name_decides(tmp_path, capsys):
    sd, _ = source_backbone("resnet18")
    state = {"state_dict": {f"module.student.backbone.{k}": v for k, v in sd.items()}, "epoch": 1, "steps": 2}
    named = tmp_path / "dino_r18_baseline.pth.tar"  # as the released files are named
    torch.save(state, named)
    assert run("import-reference", named, "--out", tmp_path / "a.pt") == 0
    assert capsys.readouterr().err.strip() == ("config dino/resnet18_baseline: the file has no config; "
                                               "its name says baseline")
    unnamed = tmp_path / "DINO_resnet18_last_ckpt.pth.tar"
    torch.save(state, unnamed)
    assert run("import-reference", unnamed, "--out", tmp_path / "b.pt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(unnamed) in err and "--config" in err
    assert not (tmp_path / "b.pt").exists()


def test_a_swav_queue_file_is_named_as_such(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "SWAV_mobilenet_v2_last_ckpt.pth.tar").write_bytes(b"")
    queue = run_dir / "queue0.pth"
    torch.save({"queue": torch.zeros(2, 480, 128)}, queue)  # as the trainer saves it, per rank
    assert run("import-reference", queue, "--out", tmp_path / "imp.pt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sslight: error: {queue}: a SwAV queue file")
    assert "not a model checkpoint" in err
    assert str(run_dir / "checkpoints" / "SWAV_mobilenet_v2_last_ckpt.pth.tar") in err
    assert not (tmp_path / "imp.pt").exists()


def _torch_bytes(legacy=False):
    buf = io.BytesIO()
    torch.save({"state_dict": {"module.student.backbone.encoder.0.weight": torch.randn(64, 3, 7, 7)}}, buf,
               _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    return buf.getvalue()


NOT_CHECKPOINTS = {  # file contents -> the reason given
    "random.bin": (lambda: np.random.default_rng(0).bytes(4096)[1:], "neither a zip archive nor a pickle"),
    "random80.bin": (lambda: b"\x80" + np.random.default_rng(1).bytes(4096), "neither a zip archive nor a pickle"),
    "notes.txt": (lambda: b"module.student.backbone: weights\n" * 20, "neither a zip archive nor a pickle"),
    "empty.pth.tar": (lambda: b"", "the file is empty"),
    "other.zip": (_zip_bytes, "a zip archive without the data.pkl that torch.save writes"),
    "cut.pth.tar": (lambda: _torch_bytes()[:-3000], "a truncated or damaged zip archive"),
    "cut_legacy.pth.tar": (lambda: _torch_bytes(legacy=True)[:-3000], "truncated (its data ends early)"),
    "plain.pkl": (lambda: __import__("pickle").dumps({"model": {}}, protocol=2),
                  "a pickle, but not one torch.save wrote"),
}


@pytest.mark.parametrize("name", list(NOT_CHECKPOINTS))
def test_not_a_checkpoint_is_one_line_and_exit_2(name, tmp_path, capsys):
    make, reason = NOT_CHECKPOINTS[name]
    src = tmp_path / name
    src.write_bytes(make())
    assert run("import-reference", src, "--out", tmp_path / "new" / "imp.pt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sslight: error: {src}: not a PyTorch checkpoint: {reason}"), err
    assert os.listdir(tmp_path) == [name]  # nothing written, no folder made
