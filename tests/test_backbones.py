"""The backbone table (sslight_dali/backbones.py) is the one place that says which backbones there are and
what each is: the config's choices, how it is built, its family, its linear-eval feature, its export
formats. The last test adds two backbones from this file alone (a CNN with a torchvision key map, a ViT
whose name does not start with "vit") and trains, evaluates and exports each in the formats its entry
declares."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision
from torch import nn

from sslight_dali import checkpoint as ckpt
from sslight_dali.backbones import BACKBONES, RESNET_ARGS, VIT_ARGS, Backbone, same_key
from sslight_dali.cli import main
from sslight_dali.config import ConfigError
from sslight_dali.run_config import load_config
from sslight_dali.knn import knn_evaluate
from sslight_dali.models import build_backbone
from sslight_dali.pretrained import load_pretrained
from sslight_dali.runtime import is_convnet

CONFIG = "configs/dino/resnet18_sslight.yaml"
SHIPPED = ["mobilenetv2_100", "resnet18", "resnet34", "vit_tiny_patch16_224"]
ALL_FORMATS = ("timm", "torchvision", "detectron2", "onnx", "hf")
TINY = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=8",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.num_threads=1",
        "train.knn_every=0", "train.log_every=1", "eval.resize=36", "eval.crop=32", "eval.batch_size=16",
        "train.device=cpu", "data.device=cpu", "train.tensorboard=false", "train.max_steps=2"]

# Added here only. ResNet50: the names are torchvision's, so its torchvision map is the identity; it has
# no Detectron2 map (its Bottleneck blocks are not D2_BLOCK's). DeiT-Tiny is a timm VisionTransformer: the
# ViT family, with its linear-eval feature from the last 2 blocks (the shipped ViT uses 4).
NEW = {
    "resnet50": Backbone("resnet50", "cnn", RESNET_ARGS, torchvision_key=same_key),
    "deit_tiny_patch16_224": Backbone("deit_tiny_patch16_224", "vit", VIT_ARGS, eval_cls_blocks=2),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    yield
    torch.set_num_threads(threads)


def run(*argv):
    return main([str(a) for a in argv])


def test_shipped_table_and_config_choices():
    assert list(BACKBONES) == SHIPPED
    assert {n: b.formats for n, b in BACKBONES.items()} == {
        "mobilenetv2_100": ("timm", "torchvision", "onnx", "hf"), "resnet18": ALL_FORMATS, "resnet34": ALL_FORMATS,
        "vit_tiny_patch16_224": ("timm", "onnx", "hf")}
    assert load_config(CONFIG, ["model.backbone=vit_tiny_patch16_224"]).model.backbone == "vit_tiny_patch16_224"
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, ["model.backbone=resnet50"])
    assert str(e.value) == (f"override model.backbone='resnet50': model.backbone: 'resnet50' is not allowed; "
                            f"choose one of {SHIPPED}")


@torch.no_grad()
def features(model, x):
    return model.eval()(x)


@torch.no_grad()
def last_cls(vit, x, n):
    """The CLS token after each of the last n blocks, through the final norm, concatenated (hooks, not
    evaluate.common's code)."""
    cls = []
    hooks = [b.register_forward_hook(lambda m, i, o: cls.append(o[:, 0])) for b in vit.blocks[-n:]]
    vit.eval()(x)
    for h in hooks:
        h.remove()
    return torch.cat([vit.norm(t) for t in cls], dim=-1)


def check_export(ckpt_path, name, entry, tmp_path, capsys):
    """Every declared format written and loadable with the trained student's features (ONNX: its linear-eval
    feature, the table's); the others refused."""
    ours = load_pretrained(ckpt_path).backbone
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = features(ours, x)
    for fmt in ALL_FORMATS:
        if fmt == "hf":  # every backbone has it (the table test above); the folder: tests/export/test_hub.py
            continue
        out = tmp_path / fmt / ("b.pkl" if fmt == "detectron2" else "b.bin")
        rc = run("export", ckpt_path, "--out", out, "--format", fmt, *(("--feature", "eval") if fmt == "onnx" else ()))
        err = capsys.readouterr().err.strip()
        if fmt not in entry.formats:
            assert rc == 2 and len(err.splitlines()) == 1 and f"--format {fmt}: {name}" in err, err
            assert not out.parent.exists()
            continue
        assert rc == 0, err
        meta = json.loads(out.with_name(out.name + ".json").read_text())
        assert (meta["arch"], meta["timm_name"], meta["format"]) == (name, name, fmt)
        if fmt == "onnx":
            ref = last_cls(ours, x, entry.eval_cls_blocks) if entry.eval_cls_blocks else want
            got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["features"],
                                                                                         {"images": x.numpy()})[0]
            assert got.shape == ref.shape and meta["feature_dim"] == ref.shape[1]
            np.testing.assert_allclose(got, ref.numpy(), atol=1e-4 * float(ref.abs().max()), rtol=0)
            continue
        sd = torch.load(out, weights_only=True)
        if fmt == "timm":  # a plain timm model of that name takes the file strictly
            model = timm.create_model(name, num_classes=0, **entry.timm_args)
            model.load_state_dict(sd, strict=True)
        else:  # torchvision's own model, with its classifier dropped
            model = getattr(torchvision.models, name)()
            assert model.load_state_dict(sd, strict=False).missing_keys == ["fc.weight", "fc.bias"]
            model.fc = nn.Identity()
        torch.testing.assert_close(features(model, x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NEW)
def test_a_backbone_added_from_this_file_trains_evaluates_and_exports(name, tiny_data, tmp_path, capsys,
                                                                      monkeypatch):
    entry = NEW[name]
    monkeypatch.setitem(BACKBONES, name, entry)  # removed again after the test
    from sslight_dali.train import train
    cfg = load_config(CONFIG, TINY + [f"model.backbone={name}", f"data.root={tiny_data}",
                                      f"train.output_dir={tmp_path / 'run'}"])
    assert is_convnet(cfg) == (entry.family == "cnn")  # channels-last and SyncBN for CNNs only
    assert train(cfg)["steps"] == 2
    state = ckpt.load(tmp_path / "run" / ckpt.LATEST)
    assert state["config"]["model"]["backbone"] == name
    pre = load_pretrained(tmp_path / "run" / ckpt.LATEST)
    dim = pre.backbone.num_features
    assert dim == timm.create_model(name, num_classes=0).num_features
    if entry.family == "vit":  # initialised like DINO's ViT: cls_token ~ N(0, 0.02), not timm's N(0, 1e-6)
        torch.manual_seed(0)
        assert 0.01 < build_backbone(name).cls_token.std() < 0.03

    # eval: kNN as the monitor computes it; both linear protocols on the table's feature and recipe
    ckpt_path = tmp_path / "run" / ckpt.LATEST
    assert run("eval", "knn", ckpt_path, "--out", tmp_path / "knn", "eval.knn_k=5") == 0
    res = json.loads((tmp_path / "knn" / "eval_knn.json").read_text())
    pre.cfg.eval.knn_k = 5
    want = knn_evaluate(pre.cfg, pre.backbone, torch.device("cpu"), channels_last=False)[0]
    assert res["backbone"] == name and res["top1"] == pytest.approx(want["top1"])
    eval_dim = (entry.eval_cls_blocks or 1) * dim
    assert run("eval", "linear", ckpt_path, "--out", tmp_path / "fast", "protocol=fast", "epochs=2") == 0
    assert json.loads((tmp_path / "fast" / "eval_linear.json").read_text())["feature_dim"] == eval_dim
    assert run("eval", "linear", ckpt_path, "--out", tmp_path / "ref", "epochs=1", "batch_size=16") == 0
    res = json.loads((tmp_path / "ref" / "eval_linear.json").read_text())
    assert res["optimizer"] == {"cnn": "lars", "vit": "sgd"}[entry.family] and res["complete"]

    capsys.readouterr()
    check_export(ckpt_path, name, entry, tmp_path / "export", capsys)
