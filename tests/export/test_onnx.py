"""`sslight export --format onnx` on tiny checkpoints: every backbone's ONNX model, run in our own onnxruntime
session at batch 1 and 7, gives the features of the PyTorch backbone `load_pretrained` rebuilds; ViT-Tiny's eval
feature (last 4 CLS tokens, computed here with hooks); --fp16; refusals (missing package, failed verification,
unwritable --out) exit 2 with one line and leave nothing.

Each export takes the exporter 10-30 s on a small CPU, so every model is exported once (`exported`) and the
refusal tests that are about what follows the export hand the command an already exported model.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sslight_dali import checkpoint as ckpt
from sslight_dali import onnx_export
from sslight_dali.cli import build_parser, main
from sslight_dali.config import to_dict
from sslight_dali.run_config import load_config
from sslight_dali.methods import build_method
from sslight_dali.pretrained import load_pretrained

CONFIGS = {
    "resnet18": "configs/dino/resnet18_sslight.yaml",
    "resnet34": "configs/swav/resnet34_sslight.yaml",
    "mobilenetv2_100": "configs/moco/mobilenetv2_sslight.yaml",
    "vit_tiny_patch16_224": "configs/dino/vit_tiny_sslight.yaml",
}
CROP = {"vit_tiny_patch16_224": 224}  # the ViT at its native size; the CNNs at a small eval crop, to be quick
SMALL_CROP = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def tiny_checkpoint(path, backbone):
    crop = CROP.get(backbone, SMALL_CROP)
    cfg = load_config(CONFIGS[backbone], ["dino.out_dim=256", "dino.hidden_dim=64", "swav.num_prototypes=32",
                                          "swav.hidden_dim=64", "moco.queue_length=64", "moco.hidden_dim=64",
                                          f"eval.crop={crop}", f"eval.resize={crop}"])
    torch.manual_seed(0)
    method = build_method(cfg, 0)
    for m in method.modules():  # BN statistics away from (0, 1): features of a realistic scale, not ~1e-8
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
    ckpt.save_atomic({"model": method.state_dict(), "config": to_dict(cfg), "epoch": 3, "step": 42}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {bb: tiny_checkpoint(root / f"{bb}.pt", bb) for bb in CONFIGS}


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """export(backbone, *options) -> (model path, sidecar, the command's stdout); each export runs once."""
    cache = {}

    def export(backbone, *options):
        key = (backbone, *options)
        if key not in cache:
            d = tmp_path_factory.mktemp("onnx")
            out = d / "m.onnx"
            assert run("export", checkpoints[backbone], "--out", out, "--format", "onnx", *options) == 0
            assert sorted(p.name for p in d.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temp files left
            cache[key] = (out, json.loads((d / "m.onnx.json").read_text()))
        return cache[key]
    return export


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def images(batch, crop, seed):
    return torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("backbone", list(CONFIGS))
def test_onnx_gives_the_backbones_pooled_features_at_any_batch(backbone, checkpoints, exported, capsys):
    path, meta = exported(backbone)
    ours = load_pretrained(checkpoints[backbone]).backbone
    crop = CROP.get(backbone, SMALL_CROP)
    s = session(path)
    assert [i.name for i in s.get_inputs()] == [meta["onnx"]["input"]["name"]] == ["images"]
    assert [o.name for o in s.get_outputs()] == [meta["onnx"]["output"]["name"]] == ["features"]
    for batch in (1, 7):  # neither is the batch the exporter traced with
        x = images(batch, crop, seed=10 + batch)
        got = s.run(["features"], {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = ours(x).numpy()
        assert got.shape == ref.shape == (batch, ours.num_features)
        assert rel_err(got, ref) <= 1e-4

    model = onnx.load(str(path))
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # a named, dynamic batch axis
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param
    assert {o.domain: o.version for o in model.opset_import}[""] == meta["onnx"]["opset"] == 18
    o = meta["onnx"]
    assert (o["exporter"], o["precision"], o["feature"]) == ("dynamo", "float32", "pooled")
    assert o["input"]["shape"] == ["batch", 3, crop, crop] and o["output"]["shape"] == ["batch", ours.num_features]
    assert o["dynamic_axes"] == {"images": {"0": "batch"}, "features": {"0": "batch"}}
    v = o["verification"]
    assert v["batches"] == [1, 7] and v["max_rel_err_bound"] == onnx_export.FP32_MAX_REL_ERR
    assert 0 <= v["max_rel_err"] <= v["max_rel_err_bound"] and v["max_abs_err"] == pytest.approx(
        v["max_rel_err"] * v["max_abs_feature"])
    assert meta["format"] == "onnx" and meta["arch"] == backbone and meta["feature_dim"] == ours.num_features
    print(f"{backbone}: max abs {v['max_abs_err']:.3g} rel {v['max_rel_err']:.3g}", file=sys.__stderr__)


@torch.no_grad()
def last4_cls(vit, x):
    """The reference's ViT linear-eval feature, from the blocks' outputs (hooks on the timm model's forward)."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o[:, 0])) for b in vit.blocks]
    try:
        vit(x)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([vit.norm(t) for t in outs[-4:]], dim=-1)


def test_vit_eval_feature_is_the_last_4_cls_tokens(checkpoints, exported):
    path, meta = exported("vit_tiny_patch16_224", "--feature", "eval")
    vit = load_pretrained(checkpoints["vit_tiny_patch16_224"]).backbone
    s = session(path)
    for batch in (1, 7):
        x = images(batch, 224, seed=batch)
        got = s.run(["features"], {"images": x.numpy()})[0]
        ref = last4_cls(vit, x).numpy()
        assert got.shape == (batch, 4 * 192)
        assert rel_err(got, ref) <= 1e-4
    assert meta["feature_dim"] == 768 and meta["onnx"]["feature"] == "eval"
    assert meta["onnx"]["output"]["shape"] == ["batch", 768]


def test_fp16_halves_the_weights_keeps_a_float32_interface(checkpoints, exported):
    path, meta = exported("resnet18", "--fp16")
    model = onnx.load(str(path))
    floats = [t.data_type for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,
                                                                              onnx.TensorProto.FLOAT16)]
    assert floats and all(t == onnx.TensorProto.FLOAT16 for t in floats)
    s = session(path)
    assert s.get_inputs()[0].type == s.get_outputs()[0].type == "tensor(float)"
    ours = load_pretrained(checkpoints["resnet18"]).backbone
    x = images(7, SMALL_CROP, seed=3)
    with torch.no_grad():
        ref = ours(x).numpy()
    err = rel_err(s.run(["features"], {"images": x.numpy()})[0], ref)
    assert err <= onnx_export.FP16_MAX_REL_ERR
    v = meta["onnx"]["verification"]
    assert meta["onnx"]["precision"] == "float16" and v["max_rel_err_bound"] == onnx_export.FP16_MAX_REL_ERR
    assert 0 <= v["max_rel_err"] <= v["max_rel_err_bound"]
    print(f"resnet18 fp16: max abs {v['max_abs_err']:.3g} rel {v['max_rel_err']:.3g} (test input {err:.3g})",
          file=sys.__stderr__)


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sslight: error: "), err
    return err


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_a_missing_package_is_named(package, checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    assert run("export", checkpoints["resnet18"], "--out", tmp_path / "m.onnx", "--format", "onnx") == 2
    assert f"'{package}'" in one_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def exported_proto(exported, monkeypatch):
    """Hand the command resnet18's model as exported before (`change` edits it), skipping the exporter."""
    path, _ = exported("resnet18")

    def use(change=None):
        model = onnx.load(str(path))
        if change:
            change(model)
        monkeypatch.setattr(onnx_export, "export_proto", lambda module, crop, output="features": (model, "dynamo", None))
    return use


def corrupt(model):
    w = next(t for t in model.graph.initializer if len(t.dims) == 4)  # the first conv's weights
    a = onnx.numpy_helper.to_array(w).copy()
    a.flat[0] += 0.5
    w.CopyFrom(onnx.numpy_helper.from_array(a, w.name))


def test_a_failed_verification_is_refused(checkpoints, exported_proto, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.onnx"
    exported_proto(corrupt)  # a model that does not compute the backbone
    assert run("export", checkpoints["resnet18"], "--out", out, "--format", "onnx") == 2
    assert "verification failed" in one_line(capsys)
    assert list(tmp_path.iterdir()) == []

    exported_proto()  # the right model, but no error is small enough (not even an exact 0)
    monkeypatch.setattr(onnx_export, "FP32_MAX_REL_ERR", -1.0)
    assert run("export", checkpoints["resnet18"], "--out", out, "--format", "onnx") == 2
    assert "above the bound -1" in one_line(capsys)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(onnx_export, "FP32_MAX_REL_ERR", 1e-4)
    assert run("export", checkpoints["resnet18"], "--out", out, "--format", "onnx") == 0  # the same, in bound
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_bad_outputs_and_options_exit_2_with_one_line(checkpoints, exported_proto, tmp_path, capsys):
    exported_proto()
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    for out, needle in ((blocker / "m.onnx", "--out"), ("/proc/sslight_export.onnx", "--out"), (tmp_path, "--out")):
        assert run("export", checkpoints["resnet18"], "--out", out, "--format", "onnx") == 2
        assert needle in one_line(capsys)
    for option in (["--fp16"], ["--feature", "eval"]):
        assert run("export", checkpoints["resnet18"], "--out", tmp_path / "m.pth", "--format", "timm", *option) == 2
        assert f"{option[0]} is for --format onnx only" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_help_states_the_opset_and_bounds():
    exp = build_parser("export")._subparsers._group_actions[0].choices["export"]
    text = " ".join(exp.format_help().split())
    assert f"opset {onnx_export.OPSET}" in text
    assert f"{onnx_export.FP16_MAX_REL_ERR:g} instead of {onnx_export.FP32_MAX_REL_ERR:g}" in text


def test_the_torchscript_exporter_is_the_fallback_and_is_named(checkpoints, tmp_path, monkeypatch):
    real = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("planted dynamo failure\nsecond line")
        return real(*args, dynamo=False, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    out = tmp_path / "m.onnx"
    assert run("export", checkpoints["resnet18"], "--out", out, "--format", "onnx") == 0
    o = json.loads((tmp_path / "m.onnx.json").read_text())["onnx"]
    assert o["exporter"] == "torchscript" and o["dynamo_error"] == \
        "RuntimeError: planted dynamo failure"
    ours = load_pretrained(checkpoints["resnet18"]).backbone
    s = session(out)
    for batch in (1, 7):
        x = images(batch, SMALL_CROP, seed=batch)
        with torch.no_grad():
            assert rel_err(s.run(["features"], {"images": x.numpy()})[0], ours(x).numpy()) <= 1e-4
