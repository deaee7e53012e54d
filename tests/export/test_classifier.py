"""`sslight export EVAL_CHECKPOINT --format onnx|timm`: the classifier of an `eval semi` / `eval linear` run.

Tiny CPU runs of both evals on a ResNet18 checkpoint; the exported ONNX model's logits in onnxruntime are
compared with logits computed here by hand from the checkpoints (backbone + head weights, not the export's
own model), at batch 1 and 7, and its argmax on the val images must give the top-1 the eval itself wrote.
The ViT linear classifier is checked on a hand-made eval checkpoint: its feature must be the last 4 blocks'
CLS tokens through the final norm."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from helpers import CASES, REPO, run, tiny_checkpoint
from sslight_dali import checkpoint as ckpt
from sslight_dali.data import build_eval_loader
from sslight_dali.models import build_backbone
from sslight_dali.pretrained import load_pretrained
from sslight_dali.run_config import load_config

TINY = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=16",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.num_threads=1",
        "train.knn_every=0", "eval.resize=36", "eval.crop=32", "eval.batch_size=32", "train.device=cpu",
        "data.device=cpu", "train.tensorboard=false", "train.max_steps=1", "data.backend=torchvision"]
CONFIG = REPO / "configs/dino/resnet18_sslight.yaml"


@pytest.fixture(scope="module")
def evals(synth_root, tmp_path_factory):
    """A one-step DINO ResNet18 checkpoint, a 2-epoch `eval linear` and a 1-epoch `eval semi` on it."""
    from sslight_dali.train import train
    root = tmp_path_factory.mktemp("clf")
    cfg = load_config(CONFIG, TINY + [f"data.root={synth_root}", f"train.output_dir={root / 'pre'}"])
    train(cfg)
    pre = root / "pre" / ckpt.LATEST
    assert run("eval", "linear", pre, "--out", root / "linear", "epochs=2", "batch_size=16", "lr=128") == 0
    assert run("eval", "semi", pre, "--subset", "10", "--out", root / "semi", "epochs=1", "batch_size=5") == 0
    return {"cfg": cfg, "pre": pre, "linear": root / "linear", "semi": root / "semi", "root": synth_root}


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _logits(session, x: torch.Tensor) -> np.ndarray:
    return session.run(["logits"], {"images": x.numpy()})[0]


@torch.no_grad()
def _linear_by_hand(evals):
    """Eval-mode pre-training backbone, pooled features, the eval's fc."""
    net = load_pretrained(evals["pre"]).backbone.eval()
    fc = ckpt.load(evals["linear"] / ckpt.LATEST)["model"]
    return lambda x: F.linear(net(x), fc["weight"], fc["bias"])


@torch.no_grad()
def _semi_by_hand(evals):
    """The fine-tuned backbone and the MLP head (eval-mode BN) from the eval checkpoint's tensors."""
    sd = ckpt.load(evals["semi"] / ckpt.LATEST)["model"]
    net = build_backbone("resnet18")
    net.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    net.eval()

    def head(h, i):
        h = F.linear(h, sd[f"head.fc{i}.weight"], sd[f"head.fc{i}.bias"])
        return F.gelu(F.batch_norm(h, sd[f"head.bn{i}.running_mean"], sd[f"head.bn{i}.running_var"],
                                   sd[f"head.bn{i}.weight"], sd[f"head.bn{i}.bias"], False, 0.0, 1e-5))

    return lambda x: F.linear(head(head(net(x), 1), 2), sd["head.fc3.weight"], sd["head.fc3.bias"])


def _val(evals):
    x, y = zip(*[(im, lab) for im, lab, _ in build_eval_loader(evals["cfg"], "val", channels_last=False)])
    return torch.cat(x), torch.cat(y)


@pytest.mark.parametrize("kind", ["linear", "semi"])
def test_classifier_onnx_logits_and_predictions_match_the_eval(kind, evals, tmp_path):
    out = tmp_path / "clf.onnx"
    assert run("export", evals[kind] / ckpt.LATEST, "--format", "onnx", "--out", out) == 0
    meta = json.loads(out.with_name("clf.onnx.json").read_text())
    c = meta["classifier"]
    assert c["eval"] == kind and c["num_classes"] == 4 and c["classes"] == sorted(p.name for p in (evals["root"] / "train").iterdir())
    assert meta["input_size"] == [3, 32, 32] and meta["resize"] == 36
    assert meta["onnx"]["output"] == {"name": "logits", "shape": ["batch", 4], "dtype": "float32"}
    v = meta["onnx"]["verification"]
    assert v["max_rel_err"] <= v["max_rel_err_bound"] == 1e-4
    by_hand = _linear_by_hand(evals) if kind == "linear" else _semi_by_hand(evals)
    session = _session(out)
    g = torch.Generator().manual_seed(3)
    for batch in (1, 7):  # the batch axis is dynamic
        x = torch.randn(batch, 3, 32, 32, generator=g)
        with torch.no_grad():
            want = by_hand(x).numpy()
        got = _logits(session, x)
        assert got.shape == (batch, 4)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # the val predictions give the top-1 the eval's accuracy code wrote for its last epoch (its checkpoint)
    x, y = _val(evals)
    top1 = 100.0 * (_logits(session, x).argmax(1) == y.numpy()).mean()
    history = json.loads((evals[kind] / f"eval_{kind}.json").read_text())["history"]
    assert top1 == pytest.approx(history[-1]["top1"]) and len(y) == history[-1]["val_images"]


def test_classifier_timm_state_dict_loads_into_the_eval_model(evals, tmp_path):
    from sslight_dali.evaluate.semi import SemiModel
    out = tmp_path / "semi.pth"
    assert run("export", evals["semi"] / ckpt.LATEST, "--format", "timm", "--out", out) == 0
    sd = torch.load(out, weights_only=True)
    model = SemiModel(build_backbone("resnet18"), sd["head.fc1.weight"].shape[0], 4)
    model.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), _semi_by_hand(evals)(x))
    assert json.loads(Path(f"{out}.json").read_text())["classifier"]["module"].endswith("SemiModel")


def test_vit_linear_classifier_reads_the_last_four_cls_tokens(tmp_path):
    pre = tiny_checkpoint(tmp_path / "vit.pt", CASES["vit_tiny_patch16_224"][0])
    g = torch.Generator().manual_seed(5)
    fc = {"weight": torch.randn(3, 768, generator=g) * 0.05, "bias": torch.randn(3, generator=g)}
    ev = tmp_path / "eval" / ckpt.LATEST
    ckpt.save_atomic({"eval_settings": {"checkpoint": str(pre), "weights": "student", "protocol": "reference",
                                        "crop": 224, "resize": 256}, "model": fc, "epoch": 1}, ev)
    out = tmp_path / "vit.onnx"
    assert run("export", ev, "--format", "onnx", "--out", out) == 0
    vit = load_pretrained(pre).backbone.eval()
    cls = []
    hooks = [b.register_forward_hook(lambda m, i, o: cls.append(o[:, 0])) for b in vit.blocks]
    x = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        vit(x)
        want = F.linear(torch.cat([vit.norm(t) for t in cls[-4:]], 1), fc["weight"], fc["bias"]).numpy()
    for h in hooks:
        h.remove()
    got = _logits(_session(out), x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_bad_eval_checkpoints_are_one_line_exit_2_and_write_nothing(evals, tmp_path, capsys):
    state = ckpt.load(evals["linear"] / ckpt.LATEST)
    state["eval_settings"]["checkpoint"] = str(tmp_path / "gone.pt")
    ckpt.save_atomic(state, tmp_path / "moved" / ckpt.LATEST)
    cases = [((tmp_path / "moved" / ckpt.LATEST, "onnx"), "gone.pt"),
             ((evals["linear"] / ckpt.LATEST, "torchvision"), "exports as onnx or timm")]
    for (src, fmt), said in cases:
        capsys.readouterr()
        out = tmp_path / "x" / "clf.out"
        assert run("export", src, "--format", fmt, "--out", out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
        assert not out.parent.exists() or not list(out.parent.iterdir())
