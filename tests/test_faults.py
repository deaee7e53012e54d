"""Fault injection: kills, signals, damaged checkpoints, failed writes and re-runs. What must hold:
nothing is lost, nothing is silent, and a resumed DALI run equals the uninterrupted one bit for bit.

Runs are `sslight train` subprocesses on the tiny dataset (MobileNetV2, 32 px views, batch 4: 8 steps
per epoch, 12 steps in all, a checkpoint every 2 steps). Faults are deterministic (SSLIGHT_FAULT, see
sslight_dali/checkpoint.py: fault_point) at points drawn from a seeded RNG, printed on failure.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslight_dali import checkpoint as ckpt
from sslight_dali.run_config import load_config
from sslight_dali.loop import EXIT_PREEMPTED, is_peer_failure as _is_peer_failure
from sslight_dali.train import train

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs/dino/mobilenetv2_sslight.yaml")
TINY = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=4",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.num_threads=1",
        "train.knn_every=0", "train.log_every=1", "train.device=cpu", "data.device=cpu",
        "train.tensorboard=false", "train.max_steps=12", "train.checkpoint_every=2"]
SEED = int(os.environ.get("SSLIGHT_FAULT_SEED", "20261124"))


def run(data, out, *extra, fault: str | None = None, fsize: int | None = None, timeout=180):
    """`sslight train` in a subprocess; SSLIGHT_FAULT=fault; RLIMIT_FSIZE=fsize bytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SSLIGHT_FAULT", None)
    if fault:
        env["SSLIGHT_FAULT"] = fault
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    cmd = [sys.executable, "-m", "sslight_dali.cli", "train", CONFIG, *TINY, f"data.root={data}",
           f"train.output_dir={out}", *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit)


def metrics(out: Path) -> list[dict]:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train"]


def assert_same_run(out: Path, ref: Path):
    """One record per step, every loss bitwise equal, final weights bitwise equal."""
    got, want = metrics(out), metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 13))
    for a, b in zip(got, want):
        assert a["loss"] == b["loss"], f"step {a['step']}: {a['loss']!r} != {b['loss']!r}"
    sa, sb = ckpt.load(out / ckpt.LATEST), ckpt.load(ref / ckpt.LATEST)
    assert sa["step"] == sb["step"] == 12
    for k, v in sb["model"].items():
        assert torch.equal(sa["model"][k], v), k


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    r = run(tiny_data, out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_is_bitwise(tiny_data, reference, tmp_path):
    rng = random.Random(SEED)
    # Inside a checkpoint write (data written, not yet renamed), between the step file and the
    # checkpoint.pt link, and after optimizer steps (past the last checkpoint, whose records and
    # work are lost and redone).
    faults = [f"checkpoint_write:{rng.randint(1, 2)}", f"step:{rng.randint(1, 3)}", "checkpoint_link:1",
              f"step:{rng.randint(2, 4)}", "checkpoint_write:1"]
    rng.shuffle(faults)
    out = tmp_path / "run"
    for fault in faults:
        r = run(tiny_data, out, "resume=auto", fault=fault)
        assert r.returncode == -9, f"seed {SEED}, fault {fault}: rc {r.returncode}\n{r.stderr[-2000:]}"
    r = run(tiny_data, out, "resume=auto")
    assert r.returncode == 0, f"seed {SEED}, faults {faults}\n{r.stderr[-2000:]}"
    assert_same_run(out, reference)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names  # partial writes were removed
    assert [n for n in names if n.startswith("checkpoint_step")] == [ckpt.step_name(10), ckpt.step_name(12)]


@pytest.mark.slow
def test_sigterm_saves_at_that_step_then_resume_is_exact_and_a_write_error_is_one_line(tiny_data, reference,
                                                                                          tmp_path):
    step = random.Random(SEED + 1).randint(1, 11)
    out = tmp_path / "run"
    r = run(tiny_data, out, fault=f"step:{step}:TERM")
    assert r.returncode == EXIT_PREEMPTED, r.stderr[-2000:]
    assert f"stopped by SIGTERM at step {step} " in r.stderr.splitlines()[-1]
    assert ckpt.load(out / ckpt.LATEST)["step"] == step
    saved = (out / ckpt.LATEST).read_bytes()

    # The next checkpoint write hits a 1 MiB file size limit: one line naming the directory, exit 2,
    # the previous checkpoint untouched and no partial file left behind.
    r = run(tiny_data, out, "resume=auto", "train.checkpoint_every=1", fsize=2 ** 20)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sslight: error: cannot write a checkpoint in {out}:"), err
    assert (out / ckpt.LATEST).read_bytes() == saved
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    r = run(tiny_data, out, "resume=auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(out, reference)


def test_damaged_checkpoints_are_refused_and_resume_falls_back(reference, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    os.unlink(out / ckpt.LATEST)
    os.link(out / ckpt.step_name(12), out / ckpt.LATEST)  # as written: one file, two names
    # checkpoint.pt is the step-12 file (a hard link): 4 KiB zeroed in its middle damages both.
    with open(out / ckpt.LATEST, "r+b") as f:
        f.seek(os.path.getsize(out / ckpt.LATEST) // 2)
        f.write(bytes(4096))
    with pytest.raises(ckpt.CheckpointError, match="damaged|not a complete checkpoint"):
        ckpt.load(out / ckpt.step_name(12))
    (out / ".checkpoint_step00000014.pt.123.tmp").write_bytes(b"partial")
    with caplog.at_level("WARNING"):
        path, state = ckpt.newest_valid(out)
    assert path.name == ckpt.step_name(10) and state["step"] == 10
    assert f"skipping {out / ckpt.LATEST}" in caplog.text and f"skipping {out / ckpt.step_name(12)}" in caplog.text

    (out / ckpt.step_name(10)).write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"empty \(0 bytes"):
        ckpt.load(out / ckpt.step_name(10))
    # A checkpoint written before checksums existed still loads.
    old = {k: v for k, v in ckpt.load(reference / ckpt.LATEST).items()}
    torch.save(old, out / "old.pt")
    assert ckpt.load(out / "old.pt")["step"] == 12
    ckpt.remove_stale_temps(out)
    assert not list(out.glob(".*.tmp"))


def test_a_fresh_run_never_overwrites_an_earlier_one(tiny_data, tmp_path):
    def cfg(*extra):
        return load_config(CONFIG, TINY + [f"data.root={tiny_data}", f"train.output_dir={tmp_path / 'run'}",
                                           "train.max_steps=2", *extra])
    train(cfg())
    first = (tmp_path / "run" / ckpt.LATEST).read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="already holds a run.*resume=auto.*train.overwrite=true"):
        train(cfg("train.max_steps=1"))
    assert (tmp_path / "run" / ckpt.LATEST).read_bytes() == first
    train(cfg("train.max_steps=1", "train.overwrite=true"))
    (moved,) = tmp_path.glob("run.old-*")
    assert (moved / ckpt.LATEST).read_bytes() == first and len(metrics(moved)) == 2
    assert ckpt.load(tmp_path / "run" / ckpt.LATEST)["step"] == 1 and len(metrics(tmp_path / "run")) == 1

    (tmp_path / "file").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="train.output_dir .*file/out cannot be used"):
        train(load_config(CONFIG, TINY + [f"data.root={tiny_data}", f"train.output_dir={tmp_path / 'file' / 'out'}"]))


# --- a user's own folder and one-line errors --------------------------------------------------------
def _cfg(data, out, *extra):
    return load_config(CONFIG, TINY + [f"data.root={data}", f"train.output_dir={out}", *extra])


def test_an_unlabeled_folder_trains_with_knn_and_probe_off(tiny_data, tmp_path, capsys):
    flat = tmp_path / "photos" / "train"
    flat.mkdir(parents=True)
    for i, p in enumerate(sorted((tiny_data / "train").rglob("*.jpg"))):
        shutil.copy(p, flat / f"{i:03d}.jpg")
    (flat / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    result = train(_cfg(tmp_path / "photos", tmp_path / "out", "train.max_steps=2", "train.knn_every=1"))
    log = capsys.readouterr().out  # the run's log handler prints to stdout
    assert result["steps"] == 2 and result["epochs"] == 0 and "epoch" not in result
    assert "no class folders: using them without labels" in log
    assert "1 dangling symlink(s)" in log and "gone.jpg" in log
    assert "kNN monitoring is off" in log and "joint linear probe is off" in log
    assert "probe_loss" not in metrics(tmp_path / "out")[0]
    # data.format=folder: nested, no split folder at all.
    nested = tmp_path / "nested"
    shutil.copytree(tiny_data / "train", nested / "a" / "b")
    result = train(_cfg(nested, tmp_path / "out2", "train.max_steps=1", "data.format=folder"))
    assert result["steps"] == 1


def test_user_errors_are_one_line_naming_the_key(tiny_data, tmp_path, capsys):
    from sslight_dali.cli import main

    def cli(*args):
        rc = main(["train", CONFIG, *TINY, f"data.root={tiny_data}", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    err = cli(f"train.output_dir={tmp_path / 'small'}", "train.batch_size=64")
    assert "fewer than one batch (train.batch_size=64)" in err
    log = tmp_path / "small" / "train.log"
    assert not log.exists() or log.stat().st_size > 0  # no empty log left behind
    no_val = tmp_path / "noval"
    shutil.copytree(tiny_data / "train", no_val / "train")
    err = cli(f"data.root={no_val}", f"train.output_dir={tmp_path / 'o1'}", "train.knn_every=1")
    assert "split directory not found" in err and "train.knn_every=0" in err
    err = cli(f"train.output_dir={tmp_path / 'o2'}", "train.max_steps=notanumber")
    assert err.startswith("sslight: config error: override train.max_steps='notanumber'") and CONFIG not in err
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("method: dino  # caf\xe9\n".encode("latin-1"))
    rc = main(["train", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not UTF-8" in err and str(bad) in err
    assert load_config(CONFIG, ["train.output_dir=2024"]).train.output_dir == "2024"

    # Resume after the data set changed: one line saying so.
    out = tmp_path / "changed"
    train(_cfg(tiny_data, out, "train.max_steps=1"))
    fewer = tmp_path / "fewer"
    shutil.copytree(tiny_data, fewer)
    next((fewer / "train").rglob("*.jpg")).unlink()
    err = cli(f"data.root={fewer}", f"train.output_dir={out}", "train.max_steps=2", "resume=auto")
    assert "written on 32 images and the data now has 31" in err


def test_pixel_limit_is_a_setting(tmp_path):
    from PIL import Image
    from sslight_dali.data.sources import check_image, set_pixel_limit
    import io as _io
    buf = _io.BytesIO()
    Image.new("L", (300, 200)).save(buf, "PNG")
    try:
        set_pixel_limit(20000)  # refused above 2x: 60000 pixels is a "bomb"
        assert "data.max_image_pixels" in check_image(buf.getvalue())
        set_pixel_limit(0)
        assert check_image(buf.getvalue()) is None
    finally:
        set_pixel_limit(89478485)


# --- two processes (gloo): a signal to one rank, a dead rank --------------------------------------
def run2(data, out, *extra, faults=(None, None), timeout=120):
    """Two `sslight train` processes (RANK 0/1) as torchrun would start them; returns both results."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("SSLIGHT_FAULT", None)
        if faults[rank]:
            env["SSLIGHT_FAULT"] = faults[rank]
        cmd = [sys.executable, "-m", "sslight_dali.cli", "train", CONFIG, *TINY, f"data.root={data}",
               f"train.output_dir={out}", "train.max_steps=6", "train.dist_timeout_s=10", *extra]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank did not exit within {timeout} s")
        results.append((p.returncode, err))
    return results


# Messages as torch 2.14 words them: gloo's from two processes where one exits or stops answering (a
# plain RuntimeError), NCCL's from ncclGetErrorString and ProcessGroupNCCL (DistBackendError).
GLOO = "[/pytorch/third_party/gloo/gloo/transport/tcp/"
NCCL = "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, "
PEER_LOST = [
    RuntimeError(GLOO + "pair.cc:561] Connection closed by peer [127.0.0.1]:922. This is typically caused by a "
                 "remote worker crashing."),
    RuntimeError(GLOO + "unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"),
    RuntimeError(GLOO + "pair.cc:598] Read error [10.0.0.2]:40312: Connection reset by peer"),
    RuntimeError(GLOO + "pair.cc:590] Write error [10.0.0.2]:40312: Broken pipe"),
    torch.distributed.DistBackendError(NCCL + "remote process exited or there was a network error, NCCL version 2.27.7"),
    torch.distributed.DistBackendError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
                                       "OpType=ALLREDUCE, Timeout(ms)=600000) ran for 600012 milliseconds"),
    torch.distributed.DistBackendError("NCCL communicator was aborted on rank 0. Original reason for failure was: "
                                       "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)"),
    torch.distributed.DistNetworkError("failed to recv, got 0 bytes"),
    torch.distributed.DistStoreError("wait timeout after 600000ms, keys: /default_pg/0//cuda//0"),
]
NOT_PEER = [  # bugs or local failures: the traceback must stay
    torch.distributed.DistBackendError(NCCL + "invalid usage (run with NCCL_DEBUG=WARN for details), NCCL version "
                                       "2.27.7\nncclInvalidUsage: This usually reflects invalid usage of NCCL library."),
    torch.distributed.DistBackendError(NCCL + "unhandled cuda error (run with NCCL_DEBUG=INFO for details)"),
    torch.distributed.DistBackendError(NCCL + "internal error - please report this issue to the NCCL developers"),
    RuntimeError("NCCL error: invalid usage (run with NCCL_DEBUG=WARN for details)"),
    RuntimeError("DataLoader timed out after 30 seconds"),
    RuntimeError("DALI pipeline: timeout reading /data/train/n01440764/x.JPEG"),
    ValueError("unsupported reduce op for the gloo backend"),
    ValueError("Tensors must be CUDA and dense for the nccl backend"),
    RuntimeError("Connection reset by peer"),  # not from torch.distributed: e.g. a network file system
    RuntimeError("CUDA error: an illegal memory access was encountered"),
]


@pytest.mark.parametrize("e", PEER_LOST + NOT_PEER, ids=lambda e: f"{type(e).__name__}:{str(e).replace(NCCL, '').replace(GLOO, '')[:50]}")
def test_only_a_lost_peer_is_relabelled(e):
    assert _is_peer_failure(e) == any(e is x for x in PEER_LOST)


@pytest.mark.slow
def test_two_ranks_agree_on_a_signal_and_survive_a_dead_peer(tiny_data, tmp_path):
    ref = tmp_path / "ref"
    assert [rc for rc, _ in run2(tiny_data, ref)] == [0, 0]
    out = tmp_path / "run"
    # SIGTERM to rank 1 only, after its 3rd step: both ranks stop at step 3 and one checkpoint is written.
    (rc0, err0), (rc1, err1) = run2(tiny_data, out, faults=(None, "step:3:TERM"))
    assert (rc0, rc1) == (EXIT_PREEMPTED, EXIT_PREEMPTED), err0[-1500:] + err1[-1500:]
    assert "stopped by a signal to another rank at step 3 " in err0 and "stopped by SIGTERM at step 3 " in err1
    assert ckpt.load(out / ckpt.LATEST)["step"] == 3
    # Rank 1 dies (kill -9) after global step 5: rank 0 stops with one line instead of hanging.
    (rc0, err0), (rc1, _) = run2(tiny_data, out, "resume=auto", faults=(None, "step:2"))
    assert rc1 == -9 and rc0 == 2, err0[-1500:]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("sslight: error: rank 0: lost contact with another process") and "resume=auto" in last
    assert ckpt.load(out / ckpt.LATEST)["step"] == 4
    # The restart resumes exactly: the same weights as the uninterrupted run.
    assert [rc for rc, _ in run2(tiny_data, out, "resume=auto")] == [0, 0]
    a, b = ckpt.load(out / ckpt.LATEST), ckpt.load(ref / ckpt.LATEST)
    assert a["step"] == b["step"] == 6
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k


def test_metrics_keep_one_record_per_step_after_a_resume(tmp_path):
    from sslight_dali.logger import RunLogger
    lines = [json.dumps({"kind": "train", "step": s, "loss": float(s)}) for s in range(1, 7)]
    lines.insert(4, json.dumps({"kind": "eval", "step": 4, "knn_top1": 1.0}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "train", "st')  # cut by a kill
    logger = RunLogger(tmp_path, enabled=True, tensorboard=False)
    logger.start(4)  # resumed from the step-4 checkpoint
    logger.write({"kind": "train", "step": 5, "loss": -5.0}, 5)
    logger.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in recs] == [("train", 1), ("train", 2), ("train", 3), ("train", 4),
                                                      ("eval", 4), ("train", 5)]
    assert recs[-1]["loss"] == -5.0


def test_a_second_signal_exits_at_once():
    code = ("import os, signal, time\n"
            "from sslight_dali.loop import StopSignals\n"
            "with StopSignals() as s:\n"
            "    os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)\n"
            "    assert s.received == 'SIGUSR1'\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(10)\n"
            "print('still running')\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + 15 and "still running" not in r.stdout
    assert "second signal (SIGTERM): exiting now without writing a checkpoint" in r.stderr
