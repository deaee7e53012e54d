"""`sslight export --format hf` (a timm hub folder) and `--format timm` to a .safetensors name, on the tiny
checkpoints of test_export.py: timm's own `local-dir:` loader builds each backbone with our weights (the same
features), the config carries this run's preprocessing and none of timm's default weights' provenance, the
model card quotes the eval results found beside the checkpoint, and bad input is one line, exit 2, nothing
written."""
import json
import math
import sys

import pytest
import safetensors.torch
import timm
import torch

from sslight_dali import api
from sslight_dali import checkpoint as ckpt
from sslight_dali.run_config import load_config
from sslight_dali.export import ExportError
from sslight_dali.pretrained import load_pretrained
from helpers import CASES, SIZE, features, listing, run, tiny_checkpoint  # noqa: F401


@pytest.mark.parametrize("backbone", list(CASES))
def test_timm_local_dir_builds_the_backbone_with_our_weights(backbone, checkpoints, tmp_path):  # noqa: F811
    state = ckpt.load(checkpoints[backbone])  # preprocessing other than timm's defaults for the architecture
    state["config"]["eval"].update(crop=192, resize=240)
    state["config"]["recipe"]["augment"].update(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    ckpt.save_atomic(state, tmp_path / "src" / "ck.pt")
    out = tmp_path / "hub"
    assert run("export", tmp_path / "src" / "ck.pt", "--out", out, "--format", "hf") == 0
    assert listing(out) == ["README.md", "config.json", "model.safetensors", "sslight.json"]
    assert listing(tmp_path) == ["hub", "src"]  # no temp folder left
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ours = load_pretrained(checkpoints[backbone]).backbone
    size = SIZE.get(backbone, 64)
    assert model.num_classes == 0
    torch.testing.assert_close(features(model, size), features(ours, size), atol=1e-5, rtol=0)
    torch.testing.assert_close(features(api.load_backbone(out), size), features(ours, size), atol=0, rtol=0)

    config = json.loads((out / "config.json").read_text())
    cfg = load_config(CASES[backbone][0], ["eval.crop=192", "eval.resize=240", "recipe.augment.mean=[0.5,0.4,0.3]",
                                           "recipe.augment.std=[0.2,0.25,0.3]"])
    pcfg = config["pretrained_cfg"]
    assert (config["architecture"], config["num_classes"], config["num_features"]) == (backbone, 0, ours.num_features)
    assert pcfg["input_size"] == [3, cfg.eval.crop, cfg.eval.crop] and pcfg["interpolation"] == "bicubic"
    assert pcfg["mean"] == list(cfg.recipe.augment.mean) and pcfg["std"] == list(cfg.recipe.augment.std)
    assert pcfg["crop_pct"] == pytest.approx(cfg.eval.crop / cfg.eval.resize) and pcfg["num_classes"] == 0
    assert not {"tag", "license", "paper_ids", "origin_url"} & set(pcfg)  # timm's default weights', not ours
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, cfg.eval.crop, cfg.eval.crop)
    assert tuple(data["mean"]) == tuple(cfg.recipe.augment.mean)
    resize, crop = timm.data.create_transform(**data).transforms[:2]  # timm's eval transform is our eval view
    assert resize.size == cfg.eval.resize and list(crop.size) == [cfg.eval.crop] * 2


@pytest.mark.parametrize("crop, resize", [(224, 256), (32, 36), (192, 240), (96, 110), (160, 183)])
def test_timm_resizes_to_our_eval_resize(crop, resize):
    from sslight_dali.hub_export import crop_pct
    assert math.floor(crop / crop_pct(crop, resize)) == resize and abs(crop_pct(crop, resize) - crop / resize) < 1e-12


def test_a_new_head_on_the_hub_backbone(checkpoints, tmp_path):  # noqa: F811
    out = tmp_path / "hub"
    assert run("export", checkpoints["resnet18"], "--out", out, "--format", "hf", "--weights", "teacher") == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=7).eval()
    assert model.fc.out_features == 7
    teacher = load_pretrained(checkpoints["resnet18"], "teacher").backbone
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), teacher(x),
                                   atol=1e-5, rtol=0)


def test_the_model_card_quotes_the_eval_results_of_this_checkpoint(checkpoints, tmp_path):  # noqa: F811
    ck = tiny_checkpoint(tmp_path / "run" / "checkpoint.pt", CASES["resnet18"][0])
    (tmp_path / "run" / "eval_knn").mkdir()
    (tmp_path / "run" / "eval_knn" / "eval_knn.json").write_text(json.dumps(
        {"checkpoint": str(ck.resolve()), "pretrain_epoch": 3, "weights": "student", "mode": "val_loo", "k": 20,
         "top1": 61.25, "top5": 90.5, "val_images": 80}))
    linear = tmp_path / "run" / "eval_linear" / "eval_linear.json"
    linear.parent.mkdir()
    ours = {"checkpoint": str(ck.resolve()), "pretrain_epoch": 3, "weights": "student", "protocol": "fast",
            "top1_best": 55.5}
    # results of another checkpoint file, of an earlier epoch of this one, of the teacher, or without a figure
    for other in ({"checkpoint": str(tmp_path / "run" / "checkpoint_epoch1.pt")}, {"pretrain_epoch": 2},
                  {"weights": "teacher"}, {"top1_best": None}):
        linear.write_text(json.dumps({**ours, **other}))
        assert run("export", ck, "--out", tmp_path / "hub", "--format", "hf") == 0
        card = (tmp_path / "hub" / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: timm\n") and "DINO" in card and "cnn_sslight" in card
        assert "3 epoch(s)" in card and "| kNN (val_loo, k=20) | 61.25 | 90.50 |" in card and "55.5" not in card
    linear.write_text(json.dumps(ours))
    assert run("export", ck, "--out", tmp_path / "hub", "--format", "hf") == 0
    assert "55.50" in (tmp_path / "hub" / "README.md").read_text()


@pytest.mark.parametrize("fmt", ["timm", "torchvision"])
def test_export_to_a_safetensors_name(fmt, checkpoints, tmp_path):  # noqa: F811
    for name in ("b.pth", "b.safetensors"):
        assert run("export", checkpoints["mobilenetv2_100"], "--out", tmp_path / name, "--format", fmt) == 0
    pth, st = torch.load(tmp_path / "b.pth", weights_only=True), safetensors.torch.load_file(tmp_path / "b.safetensors")
    assert pth.keys() == st.keys() and all(torch.equal(pth[k], st[k]) for k in pth)
    assert json.loads((tmp_path / "b.safetensors.json").read_text())["format"] == fmt
    if fmt == "torchvision":  # load_backbone reads our own layout only, and says what to do instead
        with pytest.raises(ExportError, match="a --format torchvision export; load_backbone reads"):
            api.load_backbone(tmp_path / "b.safetensors")
        return
    ours = load_pretrained(checkpoints["mobilenetv2_100"]).backbone
    torch.testing.assert_close(features(api.load_backbone(tmp_path / "b.safetensors"), 64), features(ours, 64),
                               atol=0, rtol=0)


def test_bad_hub_exports_exit_2_and_write_nothing(checkpoints, tmp_path, capsys, monkeypatch):  # noqa: F811
    good = checkpoints["resnet18"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, needle in (([taken, "--format", "hf"], "other files (notes.txt)"),
                         ([a_file, "--format", "hf"], "writes a folder"),
                         (["/proc/sslight_hub", "--format", "hf"], "/proc/sslight_hub"),
                         ([tmp_path / "h", "--format", "hf", "--fp16"], "--fp16 is for --format onnx only")):
        assert run("export", good, "--out", *argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("sslight: ") and "\n" not in err and needle in err, (argv, err)
    assert listing(tmp_path) == ["file", "taken"] and listing(taken) == ["notes.txt"]

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    for argv in ([tmp_path / "h", "--format", "hf"], [tmp_path / "b.safetensors", "--format", "timm"]):
        assert run("export", good, "--out", *argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "needs the Python package 'safetensors': pip install safetensors" in err, err
    assert listing(tmp_path) == ["file", "taken"]
    monkeypatch.undo()

    out = tmp_path / "hub"  # an earlier export is replaced whole
    assert run("export", good, "--out", out, "--format", "hf") == 0
    first = (out / "model.safetensors").read_bytes()
    assert run("export", good, "--out", out, "--format", "hf", "--weights", "teacher") == 0
    assert (out / "model.safetensors").read_bytes() != first and listing(tmp_path) == ["file", "hub", "taken"]
