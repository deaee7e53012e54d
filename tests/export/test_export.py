"""`sslight export` (timm, torchvision, Detectron2) and `sslight import-reference`, on tiny checkpoints.

The checkpoints are built without training: a method with randomised weights and BN statistics, and
a teacher that differs from the student, saved with the fields a training checkpoint has.
"""
import json
import pickle

import pytest
import timm
import torch
import torchvision
import yacs.config
from torch import nn
from torch.nn import functional as F

from sslight_dali import checkpoint as ckpt
from sslight_dali.cli import main
from sslight_dali.config import to_dict
from sslight_dali.run_config import load_config
from sslight_dali.methods import build_method
from sslight_dali.pretrained import load_pretrained

from helpers import CASES, SIZE, features, listing, run, tiny_checkpoint  # noqa: F401 (the export tests' tiny checkpoints)

@pytest.mark.parametrize("backbone", list(CASES))
def test_timm_export_loads_strictly_and_gives_the_same_features(backbone, checkpoints, tmp_path):
    config, student, _ = CASES[backbone]
    out = tmp_path / "b.pth"
    assert run("export", checkpoints[backbone], "--out", out, "--format", "timm") == 0
    sd = torch.load(out, weights_only=True)
    raw = ckpt.load(checkpoints[backbone])["model"]
    assert all(torch.equal(v, raw[student + k]) for k, v in sd.items())  # the student's own tensors
    model = timm.create_model(backbone, num_classes=0)
    model.load_state_dict(sd, strict=True)
    ours = load_pretrained(checkpoints[backbone]).backbone
    size = SIZE.get(backbone, 64)
    torch.testing.assert_close(features(model, size), features(ours, size), atol=1e-5, rtol=0)

    meta = json.loads((tmp_path / "b.pth.json").read_text())
    cfg = load_config(config)
    assert meta["arch"] == meta["timm_name"] == backbone and meta["method"] == cfg.method
    assert (meta["epoch"], meta["step"], meta["weights"], meta["format"]) == (3, 42, "student", "timm")
    assert meta["recipe"] == cfg.data.recipe and meta["mean"] == [0.485, 0.456, 0.406]
    assert meta["feature_dim"] == ours.num_features and meta["source_checkpoint"] == str(checkpoints[backbone])
    assert listing(tmp_path) == ["b.pth", "b.pth.json"]  # no temp files left


def test_teacher_on_request(checkpoints, tmp_path):
    raw = ckpt.load(checkpoints["resnet18"])["model"]
    assert run("export", checkpoints["resnet18"], "--out", tmp_path / "t.pth", "--format", "timm",
               "--weights", "teacher") == 0
    sd = torch.load(tmp_path / "t.pth", weights_only=True)
    assert all(torch.equal(v, raw["teacher.backbone." + k]) for k, v in sd.items())
    assert not torch.equal(sd["conv1.weight"], raw["student.backbone.conv1.weight"])
    assert json.loads((tmp_path / "t.pth.json").read_text())["weights"] == "teacher"


@pytest.mark.parametrize("backbone,tv_name,head", [("resnet18", "resnet18", "fc"), ("resnet34", "resnet34", "fc"),
                                                   ("mobilenetv2_100", "mobilenet_v2", "classifier")])
def test_torchvision_export_misses_only_the_classifier(backbone, tv_name, head, checkpoints, tmp_path):
    out = tmp_path / "tv.pth"
    assert run("export", checkpoints[backbone], "--out", out, "--format", "torchvision") == 0
    model = getattr(torchvision.models, tv_name)()
    missing, unexpected = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    head_keys = {k for k in model.state_dict() if k.startswith(head + ".")}
    assert set(missing) == head_keys and len(head_keys) == 2 and not unexpected
    setattr(model, head, nn.Identity())  # torchvision's pooled features, as timm's num_classes=0 gives them
    ours = load_pretrained(checkpoints[backbone]).backbone
    torch.testing.assert_close(features(model, 64), features(ours, 64), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "tv.pth.json").read_text())["format"] == "torchvision"


# Detectron2's ResNet for R18/R34, written from its modeling/backbone/resnet.py (BasicStem, BasicBlock,
# build_resnet_backbone): a Conv2d holds its norm as `.norm`; stages res2..res5; a 1x1 `shortcut` conv
# where the channels change. Its state_dict keys are the convention the exported pickle must follow.
class D2Conv(nn.Conv2d):
    def __init__(self, cin, cout, k, stride, pad):
        super().__init__(cin, cout, k, stride, pad, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


class D2BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.shortcut = D2Conv(cin, cout, 1, stride, 0) if cin != cout else None
        self.conv1 = D2Conv(cin, cout, 3, stride, 1)
        self.conv2 = D2Conv(cout, cout, 3, 1, 1)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class D2ResNet(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv1 = D2Conv(3, 64, 7, 2, 3)
        cin = 64
        for i, n in enumerate({18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]):
            cout = 64 * 2 ** i
            blocks = [D2BasicBlock(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            self.add_module(f"res{i + 2}", nn.Sequential(*blocks))
            cin = cout

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem.conv1(x)), kernel_size=3, stride=2, padding=1)
        for name in ("res2", "res3", "res4", "res5"):
            x = getattr(self, name)(x)
        return x.mean((2, 3))


@pytest.mark.parametrize("backbone,depth", [("resnet18", 18), ("resnet34", 34)])
def test_detectron2_export_follows_detectron2_names(backbone, depth, checkpoints, tmp_path):
    out = tmp_path / "d2.pkl"
    assert run("export", checkpoints[backbone], "--out", out, "--format", "detectron2") == 0
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["matching_heuristics"] is True and isinstance(obj["__author__"], str)
    d2 = D2ResNet(depth)
    assert set(obj["model"]) == set(d2.state_dict())
    assert {"stem.conv1.weight", "stem.conv1.norm.running_var", "res3.0.shortcut.norm.weight",
            "res5.1.conv2.norm.bias"} <= set(obj["model"])
    ours = load_pretrained(checkpoints[backbone]).backbone
    assert (obj["model"]["res3.0.shortcut.norm.running_var"] == ours.layer2[0].downsample[1].running_var.numpy()).all()
    d2.load_state_dict({k: torch.from_numpy(v) for k, v in obj["model"].items()}, strict=True)
    torch.testing.assert_close(features(d2, 64), features(ours, 64), atol=1e-5, rtol=0)

    # The sidecar's Detectron2 settings: pixel mean/std on Detectron2's 0-255 scale, RGB, the R18/R34 ResNet.
    settings = json.loads((tmp_path / "d2.pkl.json").read_text())["detectron2"]
    aug = load_config(CASES[backbone][0]).recipe.augment
    assert settings["MODEL.PIXEL_MEAN"] == pytest.approx([255 * m for m in aug.mean], abs=1e-6)
    assert settings["MODEL.PIXEL_STD"] == pytest.approx([255 * s for s in aug.std], abs=1e-6)
    assert settings["MODEL.PIXEL_MEAN"] == pytest.approx([123.675, 116.28, 103.53], abs=1e-6)  # torchvision's, x255
    assert (settings["INPUT.FORMAT"], settings["MODEL.RESNETS.DEPTH"], settings["MODEL.RESNETS.RES2_OUT_CHANNELS"],
            settings["MODEL.RESNETS.STEM_OUT_CHANNELS"], settings["MODEL.WEIGHTS"]) == ("RGB", depth, 64, 64, str(out))
    # They merge into a Detectron2-style config (the keys and value types of Detectron2's defaults) as the
    # README says: cfg.merge_from_list over the sidecar's items.
    cfg = yacs.config.CfgNode({"MODEL": {"WEIGHTS": "", "PIXEL_MEAN": [103.53, 116.28, 123.675],
                                         "PIXEL_STD": [1.0, 1.0, 1.0],
                                         "RESNETS": {"DEPTH": 50, "RES2_OUT_CHANNELS": 256, "STEM_OUT_CHANNELS": 64,
                                                     "STRIDE_IN_1X1": True}},
                               "INPUT": {"FORMAT": "BGR"}})
    cfg.merge_from_list([x for item in settings.items() for x in item])
    assert (cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, cfg.INPUT.FORMAT) == (depth, 64, "RGB")
    assert cfg.MODEL.PIXEL_STD == settings["MODEL.PIXEL_STD"] and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False


def test_detectron2_export_needs_a_pkl_name(checkpoints, tmp_path, capsys):
    for out in (tmp_path / "r18.pth", tmp_path / "new" / "r18.pkl.pth", tmp_path / "r18"):
        assert run("export", checkpoints["resnet18"], "--out", out, "--format", "detectron2") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--out {out}" in err and ".pkl" in err and "DetectionCheckpointer" in err
    assert listing(tmp_path) == []  # nothing written, no folder made


@pytest.mark.parametrize("backbone,fmt", [("vit_tiny_patch16_224", "torchvision"),
                                          ("vit_tiny_patch16_224", "detectron2"), ("mobilenetv2_100", "detectron2")])
def test_formats_a_backbone_has_no_equivalent_in_are_refused(backbone, fmt, checkpoints, tmp_path, capsys):
    out = tmp_path / "x.pth"
    assert run("export", checkpoints[backbone], "--out", out, "--format", fmt) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--format {fmt}" in err
    assert listing(tmp_path) == []


def test_bad_export_inputs_exit_2_with_one_line_and_write_nothing(checkpoints, tmp_path, capsys):
    good = checkpoints["resnet18"]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state": {"w": torch.zeros(2)}}, foreign)
    before = {p: p.read_bytes() for p in (junk, foreign)}
    for src, out, needle in ((junk, tmp_path / "o.pth", str(junk)), (foreign, tmp_path / "o.pth", str(foreign)),
                             (tmp_path / "missing.pt", tmp_path / "o.pth", "missing.pt"),
                             (good, junk / "o.pth", "--out"),             # its folder would be a file
                             (good, "/proc/sslight_export.pth", "--out"),  # a directory no one can create files in
                             (junk, junk, "--out")):                      # would replace its own input
        assert run("export", src, "--out", out, "--format", "timm") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("sslight: ") and needle in err, err
    assert sorted(before) == sorted(tmp_path.iterdir())
    assert all(p.read_bytes() == b for p, b in before.items())
    assert run("export", good, "--out", tmp_path / "new" / "o.pth", "--format", "timm") == 0  # a missing folder is made
    assert (tmp_path / "new" / "o.pth").is_file() and (tmp_path / "new" / "o.pth.json").is_file()
    with pytest.raises(SystemExit) as e:  # an unknown format is argparse's choice error
        run("export", good, "--out", tmp_path / "o.pth", "--format", "tflite")
    assert e.value.code == 2 and "--format" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# import-reference: state dicts laid out as the reference's released checkpoints. Its backbone wraps a
# torchvision model: `encoder = Sequential(*children[:-2])` (ResNet) or `features` (MobileNetV2); its
# ViT is DINO's, whose names are timm's. Heads, classifier and queue sit around it.
# ------------------------------------------------------------------------------------------------
def reference_resnet(tv):
    encoder = nn.Sequential(*list(tv.children())[:-2])
    return {"encoder." + k: v for k, v in encoder.state_dict().items()}


def reference_mnv2(tv):
    return {"encoder." + k: v for k, v in tv.features.state_dict().items()}


def reference_file(path, backbone_sd, student, teacher=None, extra=True):
    sd = {}
    for prefix, noise in ((student, 0.0), (teacher, 0.01)):
        if prefix:
            sd.update({f"module.{prefix}.backbone.{k}": v + noise * torch.randn_like(v) if v.is_floating_point() else v
                       for k, v in backbone_sd.items()})
    if extra:
        sd.update({f"module.{student}.head.mlp.0.weight": torch.randn(8, 4),
                   "module.classifier.weight": torch.randn(10, 4), "module.queue": torch.randn(4, 16)})
    torch.save({"state_dict": sd, "epoch": 200, "steps": 250200}, path)
    return sd


@torch.no_grad()
def randomized(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["dino_r18", "moco_mnv2", "swav_r34"])
def test_import_reference_cnn_maps_back_exactly(kind, tmp_path):
    method, arch = kind.split("_")
    tv_name = {"r18": "resnet18", "r34": "resnet34", "mnv2": "mobilenet_v2"}[arch]
    tv = randomized(getattr(torchvision.models, tv_name)())
    ref_sd = reference_resnet(tv) if arch != "mnv2" else reference_mnv2(tv)
    student, teacher = {"dino": ("student", "teacher"), "moco": ("encoder_q", "encoder_k"),
                        "swav": ("network", None)}[method]
    src = tmp_path / f"{kind}_baseline.pth.tar"
    sd = reference_file(src, ref_sd, student, teacher)
    assert run("import-reference", src, "--out", tmp_path / "imp.pt") == 0
    pre = load_pretrained(tmp_path / "imp.pt")
    assert pre.cfg.method == method and pre.cfg.data.recipe.endswith("baseline.yaml")  # the file name says baseline
    assert (pre.epoch, pre.step) == (200, 250200)
    # every tensor is the reference's, by name: through the torchvision names back to the reference's
    from sslight_dali.export import reference_key
    got = pre.backbone.state_dict()
    assert len(got) == len(ref_sd)
    assert all(torch.equal(v, ref_sd[reference_key(k, pre.cfg.model.backbone)]) for k, v in got.items())
    setattr(tv, "fc" if arch != "mnv2" else "classifier", nn.Identity())
    torch.testing.assert_close(features(pre.backbone, 64), features(tv, 64), atol=1e-5, rtol=0)
    if teacher:
        t = load_pretrained(tmp_path / "imp.pt", "teacher").backbone.state_dict()
        assert all(torch.equal(v, sd[f"module.{teacher}.backbone.{reference_key(k, pre.cfg.model.backbone)}"])
                   for k, v in t.items())
    # and the imported checkpoint exports like one of ours
    assert run("export", tmp_path / "imp.pt", "--out", tmp_path / "e.pth", "--format", "torchvision") == 0


class CallsOnLoad:
    def __reduce__(self):
        import os
        return os.system, ("touch ran",)


def test_import_reference_refuses_keys_that_do_not_map(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref_sd = reference_resnet(torchvision.models.resnet18())
    cases = {}
    bad = dict(ref_sd)
    bad["encoder.5.0.bn3.weight"] = bad.pop("encoder.5.0.bn2.weight")  # first bad key in file order ...
    bad["encoder.7.1.conv3.weight"] = torch.zeros(1)                     # ... then another
    cases["unknown"] = (bad, "module.student.backbone.encoder.5.0.bn3.weight")
    short = {k: v for k, v in ref_sd.items() if k != "encoder.6.1.bn1.running_var"}
    cases["missing"] = (short, "module.student.backbone.encoder.6.1.bn1.running_var")
    wrong = dict(ref_sd, **{"encoder.4.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    cases["shape"] = (wrong, "module.student.backbone.encoder.4.0.conv1.weight")
    for name, (sd, needle) in cases.items():
        src = tmp_path / f"{name}.pth.tar"
        reference_file(src, sd, "student", extra=False)
        assert run("import-reference", src, "--out", tmp_path / "imp.pt") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and str(src) in err, (name, err)
    src = tmp_path / "nothing.pth.tar"
    torch.save({"state_dict": {"module.backbone.conv1.weight": torch.zeros(1)}}, src)
    assert run("import-reference", src, "--out", tmp_path / "imp.pt") == 2
    assert "module.student.backbone." in capsys.readouterr().err
    evil = tmp_path / "evil.pth.tar"  # a pickle that names a function to call is refused, not run
    torch.save({"state_dict": {}, "x": CallsOnLoad()}, evil)
    assert run("import-reference", evil, "--out", tmp_path / "imp.pt") == 2
    assert "refusing to load posix.system" in capsys.readouterr().err and not (tmp_path / "ran").exists()
    assert not (tmp_path / "imp.pt").exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_export_names_import_reference_for_a_reference_file(tmp_path, capsys):
    src = tmp_path / "dino_r18_sslight.pth.tar"
    reference_file(src, reference_resnet(torchvision.models.resnet18()), "student")
    assert run("export", src, "--out", tmp_path / "o.pth", "--format", "timm") == 2
    assert "sslight import-reference" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


def test_import_reference_config_option(tmp_path, capsys):
    src = tmp_path / "dino_r18_sslight.pth.tar"
    reference_file(src, reference_resnet(torchvision.models.resnet18()), "student", "teacher")
    base, moco = "configs/dino/resnet18_baseline.yaml", "configs/moco/resnet18_sslight.yaml"
    assert run("import-reference", src, "--out", tmp_path / "a.pt", "--config", base) == 0
    assert load_pretrained(tmp_path / "a.pt").cfg.data.recipe.endswith("baseline.yaml")  # not what the name says
    assert capsys.readouterr().err.strip() == f"config {base}: given with --config"
    assert run("import-reference", src, "--out", tmp_path / "b.pt", "--config", moco) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--config configs/moco/resnet18_sslight.yaml" in err
    assert not (tmp_path / "b.pt").exists()
