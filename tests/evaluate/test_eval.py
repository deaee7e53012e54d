"""`sslight eval linear|semi|knn` on CPU at toy size: a better backbone scores higher, the frozen backbone
stays frozen, the LR steps once per epoch, the ViT feature is the reference's, the semi head is the DINO
head's, subset files follow ImageFolder order, resume is exact and bad input is one line and exit 2."""
from __future__ import annotations

import json
import math
import os
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslight_dali import checkpoint as ckpt
from sslight_dali.cli import main as cli
from sslight_dali.synth import synth_dataset

REPO = Path(__file__).resolve().parents[2]
TINY = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=16",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.num_threads=1",
        "train.knn_every=0", "eval.resize=36", "eval.crop=32", "eval.batch_size=32", "train.device=cpu",
        "data.device=cpu", "train.tensorboard=false", "train.max_steps=1"]


def _images(cfg, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sslight_dali.data import build_eval_loader
    x, y = zip(*[(im, lab) for im, lab, _ in build_eval_loader(cfg, split, channels_last=False)])
    return torch.cat(x), torch.cat(y)


def _supervised_backbone(cfg, labelled_cfg, steps: int = 300):
    """A ResNet18 trained with labels (AdamW, a stable recipe at this size) on `labelled_cfg`'s data:
    other images of the same shape classes. Its BN statistics are then re-estimated over that data, so
    that eval mode sees the features the training made."""
    from sslight_dali.models import build_backbone
    x, y = _images(labelled_cfg, "train")
    torch.manual_seed(0)
    net = build_backbone(cfg.model.backbone)
    head = torch.nn.Linear(net.num_features, int(y.max()) + 1)
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        i = torch.randint(0, len(x), (32,))
        xb = torch.where(torch.rand(32, 1, 1, 1) < 0.5, x[i], x[i].flip(3))
        loss = F.cross_entropy(head(net(xb)), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
        for j in range(0, len(x), 64):
            net(x[j:j + 64])
        for m in bns:
            m.momentum = 0.1
    return net.eval()


@torch.no_grad()
def _ridge_top1(net, train: tuple, val: tuple, lam: float = 1.0) -> float:
    """Val top-1 of a ridge-regression classifier (closed form, no training run) on `net`'s eval-mode
    features: how linearly separable they make the classes."""
    (xt, yt), (xv, yv) = train, val
    ft, fv = net.eval()(xt).double(), net.eval()(xv).double()
    mu, sd = ft.mean(0), ft.std(0) + 1e-6
    ft, fv = (ft - mu) / sd, (fv - mu) / sd
    w = torch.linalg.solve(ft.T @ ft + lam * torch.eye(ft.shape[1], dtype=ft.dtype),
                           ft.T @ F.one_hot(yt).double())
    return (fv @ w).argmax(1).eq(yv).double().mean().item() * 100


@pytest.fixture(scope="session")
def eval_ckpts(tmp_path_factory):
    """Shape data (black/white, flat background) and two DINO ResNet18 checkpoints of this project: `random`
    (one training step from init) and `trained` (the same checkpoint, its student backbone trained with
    labels on 150 other images per class). Before any test relies on `trained` being the better backbone,
    the fixture checks it: a ridge classifier on its features must beat one on `random`'s by far."""
    from sslight_dali.run_config import load_config
    from sslight_dali.models import build_backbone
    from sslight_dali.train import train
    root = tmp_path_factory.mktemp("eval")
    data, labelled = root / "data", root / "labelled"
    shapes = dict(classes=4, min_side=40, max_side=64, clutter=0.0, colors=2)
    synth_dataset(data, per_class=24, val_per_class=8, **shapes)
    synth_dataset(labelled, per_class=150, val_per_class=1, seed=1, **shapes)
    config = REPO / "configs/dino/resnet18_sslight.yaml"
    cfg = load_config(config, TINY + [f"data.root={data}", f"train.output_dir={root / 'random'}"])
    train(cfg)
    state = ckpt.load(root / "random" / ckpt.LATEST)
    net = _supervised_backbone(cfg, load_config(config, TINY + [f"data.root={labelled}"]))
    random_net = build_backbone(cfg.model.backbone)
    prefix = "student.backbone."
    random_net.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    split = (_images(cfg, "train"), _images(cfg, "val"))
    premise = {"trained": _ridge_top1(net, *split), "random": _ridge_top1(random_net, *split)}
    # 4 classes, 32 val images: chance is 25%. Far below these bounds, the fixture failed, not the
    # evaluation code the tests check.
    assert premise["trained"] >= 75 and premise["trained"] >= premise["random"] + 25, \
        f"fixture premise: the trained backbone is not clearly better (ridge val top-1 {premise})"
    for k, v in net.state_dict().items():
        state["model"][prefix + k] = v
    ckpt.save_atomic(state, root / "trained" / ckpt.LATEST)
    return {"data": data, "random": root / "random" / ckpt.LATEST, "trained": root / "trained" / ckpt.LATEST,
            "premise": premise}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _metrics(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


# --- linear -------------------------------------------------------------------------------------
def test_fast_linear_probe_ranks_a_trained_backbone_above_random_init(eval_ckpts, tmp_path):
    top1 = {}
    for name in ("random", "trained"):
        assert cli(["eval", "linear", str(eval_ckpts[name]), "--out", str(tmp_path / name),
                    "protocol=fast", "epochs=30"]) == 0
        res = _json(tmp_path / name / "eval_linear.json")
        assert res["protocol"] == "fast" and "NOT the paper's" in res["note"]
        assert res["feature_dim"] == 512 and res["train_images"] == 96 and res["val_images"] == 32
        assert len(res["history"]) == 30 and res["top1_best"] == max(r["top1"] for r in res["history"])
        top1[name] = res["top1_best"]
    assert top1["trained"] >= top1["random"] + 15, top1  # measured 90.6% vs 34.4% (32 val images)


def test_reference_linear_protocol(eval_ckpts, tmp_path, monkeypatch):
    """A few epochs of the reference protocol: the better backbone wins, the backbone (BN statistics
    included) is untouched, the LR is one cosine value per epoch, results and metrics are written."""
    import sslight_dali.evaluate.common as common
    from sslight_dali.pretrained import load_pretrained
    seen = []
    monkeypatch.setattr(common, "load_pretrained", lambda *a: seen.append(load_pretrained(*a)) or seen[-1])
    epochs, top1 = 4, {}
    # LARS moves a weight by ~lr * eta of its norm per step: the reference's 0.8 at batch 4096 is far too
    # little for 24 steps at batch 16, so the LR is raised (for both backbones alike).
    for name in ("random", "trained"):
        out = tmp_path / name
        assert cli(["eval", "linear", str(eval_ckpts[name]), "--out", str(out), f"epochs={epochs}",
                    "batch_size=16", "lr=128", "log_every=1"]) == 0
        res = _json(out / "eval_linear.json")
        assert res["protocol"] == "reference" and res["optimizer"] == "lars" and res["complete"]
        assert res["peak_lr"] == pytest.approx(128 * 16 / 4096) and res["global_batch"] == 16
        top1[name] = res["top1_best"]
        assert res["top1_last"] == res["history"][-1]["top1"] and len(res["history"]) == epochs
        # The frozen backbone, BN running statistics included, is exactly the checkpoint's after training.
        after, before = seen[-1].backbone.state_dict(), load_pretrained(eval_ckpts[name]).backbone.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)
        # LR: constant within an epoch, the cosine from peak to 1e-6 indexed by epoch.
        steps = _metrics(out, "train")
        assert len(steps) == epochs * 6  # 96 images / batch 16
        for r in steps:
            e = r["epoch"]
            want = 1e-6 + 0.5 * (res["peak_lr"] - 1e-6) * (1 + math.cos(math.pi * e / epochs))
            assert r["lr"] == pytest.approx(want, rel=1e-9), (r["step"], r["lr"], want)
        assert [r["epoch"] for r in _metrics(out, "eval")] == list(range(1, epochs + 1))
    assert top1["trained"] >= top1["random"] + 10, top1  # measured 53.1% vs 28.1% (32 val images)


def test_frozen_linear_keeps_bn_statistics_in_train_mode():
    from sslight_dali.evaluate.linear import FrozenLinear, new_fc
    from sslight_dali.models import build_backbone
    net = build_backbone("resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = FrozenLinear(net, new_fc(512, 3)).train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert model.fc.weight.grad is not None and all(p.grad is None for p in net.parameters())
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.1) and not model.fc.bias.any()


def test_vit_feature_is_the_last_four_cls_tokens_through_the_final_norm():
    from sslight_dali.evaluate.common import feature_model
    from sslight_dali.models import build_backbone
    vit = build_backbone("vit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 64, 64)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in vit.blocks]
    with torch.no_grad():
        pooled = vit(x)  # timm's own forward: CLS token after the final norm
        feats = feature_model(vit, "vit_tiny_patch16_224")(x)
    for h in hooks:
        h.remove()
    by_hand = torch.cat([vit.norm(o[:, 0]) for o in outs[8:12]], dim=1)
    assert feats.shape == (2, 768)
    torch.testing.assert_close(feats, by_hand)
    torch.testing.assert_close(feats[:, -192:], pooled)


def test_eval_linear_resume_is_exact(eval_ckpts, tmp_path):
    args = ["eval", "linear", str(eval_ckpts["trained"]), "epochs=2", "batch_size=16", "lr=4096", "log_every=1"]
    assert cli(args + ["--out", str(tmp_path / "full")]) == 0
    assert cli(args + ["--out", str(tmp_path / "split"), "train.max_steps=4"]) == 0  # stops mid-epoch 1
    assert ckpt.load(tmp_path / "split" / ckpt.LATEST)["step"] == 4
    assert not (tmp_path / "split" / "eval_linear.json").exists()
    assert cli(args + ["--out", str(tmp_path / "split"), "resume=auto"]) == 0
    full, split = (_metrics(tmp_path / d, "train") for d in ("full", "split"))
    assert [r["step"] for r in split] == [r["step"] for r in full] == list(range(1, 13))
    for a, b in zip(full, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), a["step"]
    fa, fb = (_json(tmp_path / d / "eval_linear.json") for d in ("full", "split"))
    assert fa["history"] == fb["history"]
    wa, wb = (ckpt.load(tmp_path / d / ckpt.LATEST)["model"] for d in ("full", "split"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_eval_linear_two_gloo_processes(eval_ckpts, tmp_path):
    import torch.multiprocessing as mp
    from helpers import cli_worker as _eval_worker, free_port as _free_port
    argv = ["eval", "linear", str(eval_ckpts["trained"]), "--out", str(tmp_path), "epochs=2", "batch_size=8",
            "lr=128", "log_every=1"]
    mp.spawn(_eval_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
    res = _json(tmp_path / "eval_linear.json")
    # 96 images over 2 ranks of batch 8, last partial batch dropped: 6 steps per epoch; val shards summed.
    assert res["global_batch"] == 16 and res["steps"] == 12 and len(_metrics(tmp_path, "train")) == 12
    assert [r["val_images"] for r in res["history"]] == [32, 32]
    assert res["peak_lr"] == pytest.approx(128 * 16 / 4096)


# --- kNN ----------------------------------------------------------------------------------------
def test_eval_knn_matches_the_monitor(eval_ckpts, tmp_path):
    from sslight_dali.knn import knn_evaluate
    from sslight_dali.pretrained import load_pretrained
    assert cli(["eval", "knn", str(eval_ckpts["trained"]), "--out", str(tmp_path), "eval.knn_mode=train_val",
                "eval.knn_k=5"]) == 0
    res = _json(tmp_path / "eval_knn.json")
    pre = load_pretrained(eval_ckpts["trained"])
    pre.cfg.eval.knn_mode, pre.cfg.eval.knn_k = "train_val", 5
    want = knn_evaluate(pre.cfg, pre.backbone, torch.device("cpu"), channels_last=False)[0]
    assert res["mode"] == "train_val" and res["k"] == 5 and res["val_images"] == 32
    assert res["top1"] == pytest.approx(want["top1"]) and res["top5"] == pytest.approx(want["top5"])


# --- semi-supervised ----------------------------------------------------------------------------
def test_semi_head_starts_from_the_dino_head(eval_ckpts):
    from sslight_dali.evaluate.semi import build_model
    from sslight_dali.pretrained import load_pretrained
    pre = load_pretrained(eval_ckpts["trained"])
    state = ckpt.load(eval_ckpts["trained"])["model"]
    model = build_model(pre, 4, use_head=True)
    pairs = {"fc1": "mlp.0", "bn1": "mlp.1", "fc2": "mlp.3", "bn2": "mlp.4"}
    for mine, theirs in pairs.items():
        for k, v in getattr(model.head, mine).state_dict().items():
            assert torch.equal(v, state[f"student.head.{theirs}.{k}"]), f"{mine}.{k}"
    assert model.head.fc3.out_features == 4 and model.head.fc1.out_features == pre.cfg.dino.hidden_dim
    teacher = build_model(load_pretrained(eval_ckpts["trained"], "teacher"), 4, use_head=True)
    assert torch.equal(teacher.head.fc1.weight, state["teacher.head.mlp.0.weight"])


def test_subset_sizes_per_class_and_seed():
    from sslight_dali.evaluate.semi import draw_subset
    labels = [0] * 732 + [1] * 1300 + [2] * 1260 + [3] * 40
    for pct, want in ((1, [7, 13, 13, 1]), (10, [73, 130, 126, 4])):
        idx = draw_subset(labels, pct, seed=0)
        assert np.bincount(np.asarray(labels)[idx]).tolist() == want
        assert idx == sorted(set(idx)) and idx == draw_subset(labels, pct, seed=0) != draw_subset(labels, pct, 1)


def test_subset_file_round_trips_in_imagefolder_order(eval_ckpts, tmp_path):
    from torchvision.datasets import ImageFolder

    from sslight_dali.data import list_samples
    from sslight_dali.evaluate.semi import draw_subset, read_subset, write_subset
    full = list_samples(eval_ckpts["data"], "train", check=False)
    idx = draw_subset(full.labels, 10, seed=3)
    write_subset(tmp_path / "s.txt", full, idx)
    assert read_subset(tmp_path / "s.txt", full) == idx
    ref = ImageFolder(str(eval_ckpts["data"] / "train"))
    for line in (tmp_path / "s.txt").read_text().splitlines():
        i, label, wnid, name = line.split(",")
        path, y = ref.samples[int(i)]
        assert (Path(path).name, y, ref.classes[y]) == (name, int(label), wnid)


def test_eval_semi_end_to_end_and_subset_reuse(eval_ckpts, tmp_path):
    base = ["eval", "semi", str(eval_ckpts["trained"]), "epochs=1", "batch_size=5", "data.backend=torchvision"]
    assert cli(base + ["--subset", "10", "--out", str(tmp_path / "a")]) == 0
    res = _json(tmp_path / "a" / "eval_semi.json")
    subset = tmp_path / "a" / "subset_10percent_seed0.txt"
    assert res["subset_images"] == 8 and len(subset.read_text().splitlines()) == 8 and res["use_head"]
    assert res["complete"] and len(res["history"]) == 1 and 0 <= res["top1_best"] <= 100
    assert cli(base + ["--subset", str(subset), "--out", str(tmp_path / "b")]) == 0
    assert _json(tmp_path / "b" / "eval_semi.json")["subset_images"] == 8


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_one_line_exit_2_and_writes_nothing(eval_ckpts, tmp_path, capsys):
    ck = str(eval_ckpts["trained"])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    other = ckpt.load(ck)
    other["config"]["model"]["backbone"] = "resnet34"
    ckpt.save_atomic(other, tmp_path / "r34.pt")
    headless = ckpt.load(ck)
    headless["model"] = {k: v for k, v in headless["model"].items() if ".backbone." in k}  # as import-reference
    ckpt.save_atomic(headless, tmp_path / "headless.pt")
    subset = tmp_path / "subset.txt"
    subset.write_text("0,0,00_disc,not_there.jpg\n")
    cases = {
        "foreign": (["eval", "linear", str(foreign)], "not an sslight-dali training checkpoint"),
        "backbone": (["eval", "knn", str(tmp_path / "r34.pt")], "do not fit resnet34"),
        "val split": (["eval", "linear", ck, "data.val_split=nope"], "nope"),
        "subset": (["eval", "semi", ck, "--subset", str(subset)], "subset.txt:1"),
        "subset missing": (["eval", "semi", ck, "--subset", str(tmp_path / "none.txt")], "none.txt"),
        "no head": (["eval", "semi", str(tmp_path / "headless.pt"), "--subset", "10"], "no student DINO head"),
        "no root": (["eval", "knn", ck, "data.root="], "data.root is empty"),
        "key": (["eval", "linear", ck, "protcol=fast"], "did you mean"),
        "value": (["eval", "linear", ck, "protocol=quick"], "eval.linear.protocol"),
    }
    for name, (argv, needle) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        assert cli(argv + ["--out", str(out)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("sslight:") and "\n" not in err and needle in err, (name, err)
        assert not out.exists(), name


# --- the run loop shared with pre-training: stop signals, checkpoint write errors ------------------
SEED = int(os.environ.get("SSLIGHT_FAULT_SEED", "20261124"))
# 96 train images: linear at batch 16 runs 6 steps per epoch; semi on its 10% subset (8 images) at batch
# 5 runs 2. Each stops after a step drawn from the run's steps (printed on failure).
SIGNAL_RUNS = {"linear": (["epochs=2", "batch_size=16", "lr=4096", "log_every=1"], 12),
               "semi": (["--subset", "10", "epochs=3", "batch_size=5", "log_every=1"], 6)}


def _sslight(*argv, fault=None, fsize=None, env=None) -> subprocess.Popen:
    """`sslight ARGV` in a subprocess: SSLIGHT_FAULT=fault, RLIMIT_FSIZE=fsize bytes, `env` added."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("SSLIGHT_FAULT", None)
    if fault:
        env["SSLIGHT_FAULT"] = fault
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    return subprocess.Popen([sys.executable, "-m", "sslight_dali.cli", *map(str, argv)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def _finish(proc: subprocess.Popen, timeout=300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("kind", SIGNAL_RUNS)
def test_sigterm_during_eval_saves_at_that_step_exits_75_and_resume_is_bitwise(kind, eval_ckpts, tmp_path):
    extra, steps = SIGNAL_RUNS[kind]
    step = random.Random(f"{SEED}-{kind}").randint(1, steps - 1)
    args = ["eval", kind, eval_ckpts["trained"], *extra]
    rc, err = _finish(_sslight(*args, "--out", tmp_path / "full"))
    assert rc == 0, err[-2000:]
    out = tmp_path / "split"
    rc, err = _finish(_sslight(*args, "--out", out, fault=f"step:{step}:TERM"))
    assert rc == 75, f"step {step}: rc {rc}\n{err[-2000:]}"
    assert f"stopped by SIGTERM at step {step} " in err.strip().splitlines()[-1], err[-2000:]
    assert ckpt.load(out / ckpt.LATEST)["step"] == step
    assert not (out / f"eval_{kind}.json").exists()
    rc, err = _finish(_sslight(*args, "--out", out, "resume=auto"))
    assert rc == 0, err[-2000:]
    # One record per step, every loss bitwise equal; the same val history; the same final weights.
    full, split = (_metrics(tmp_path / d, "train") for d in ("full", "split"))
    assert [r["step"] for r in split] == [r["step"] for r in full] == list(range(1, steps + 1))
    assert [r["loss"] for r in split] == [r["loss"] for r in full], f"step {step}"
    ra, rb = (_json(tmp_path / d / f"eval_{kind}.json") for d in ("full", "split"))
    assert rb["complete"] and rb["history"] == ra["history"] and rb["steps"] == ra["steps"] == steps
    wa, wb = (ckpt.load(tmp_path / d / ckpt.LATEST)["model"] for d in ("full", "split"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"step {step}"


@pytest.mark.slow
def test_a_rank0_eval_checkpoint_write_failure_ends_both_ranks_at_once(eval_ckpts, tmp_path):
    # Two gloo ranks (batch 8: 6 steps per epoch); rank 0's files are limited to 16 KiB (its log and
    # metrics stay below, the checkpoint at step 2 is larger). Both ranks must end with rank 0's one
    # line, long before train.dist_timeout_s would free a rank left waiting.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["eval", "linear", eval_ckpts["trained"], "--out", tmp_path, "epochs=2", "batch_size=8", "lr=128",
            "log_every=1", "checkpoint_every=2", "train.dist_timeout_s=120"]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.monotonic()
    procs = [_sslight(*argv, fsize=16 * 1024 if rank == 0 else None, env={**env, "RANK": str(rank),
                                                                          "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    try:
        results = [_finish(p, timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    ended = [time.monotonic() - t0]
    for rank, (rc, err) in enumerate(results):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, f"rank {rank}: rc {rc}\n{err[-2000:]}"
        assert lines[0].startswith(f"sslight: error: cannot write a checkpoint in {tmp_path}:"), (rank, lines)
    assert ended[0] < 100, ended  # start-up included; a rank left waiting would take over 120 s
    assert not (tmp_path / ckpt.LATEST).exists() and not list(tmp_path.glob(".*.tmp"))
