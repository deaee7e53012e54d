"""The trainer end to end on CPU: every config starts, losses fall, resume is exact, checkpoints are
atomic, non-finite losses stop the run, and two gloo processes stay in sync on sharded data."""
from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sslight_dali import checkpoint as ckpt
from sslight_dali.run_config import load_config
from sslight_dali.run_policy import NonFiniteLossError
from sslight_dali.train import Trainer, train

from helpers import REPO, assert_same_state, free_port as _free_port, read_metrics, tiny_cfg

CONFIGS = sorted(glob.glob(str(REPO / "configs/*/*.yaml")))

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: "/".join(Path(p).with_suffix("").parts[-2:]))
def test_every_config_trains_a_few_steps(path, tiny_data, tmp_path):
    result = train(tiny_cfg(path, tiny_data, tmp_path, "train.max_steps=2"))
    assert result["steps"] == 2
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "config.yaml").is_file()
    saved = load_config(tmp_path / "config.yaml")  # the saved resolved config is itself a valid config
    assert saved.method == load_config(path).method and saved.recipe.local.size == 16


@pytest.mark.parametrize("method", ["dino", "swav", "moco"])
def test_loss_decreases_on_synthetic_data(method, tiny_data, tmp_path):
    path = REPO / f"configs/{method}/resnet18_sslight.yaml"
    # MoCo's loss rises while its queue fills with real keys instead of random vectors: with a queue of
    # one batch it is full after the first step, so compare from the second step on.
    extra = ["train.epochs=6", "optim.warmup_epochs=1", "dino.warmup_teacher_temp_epochs=0",
             "swav.epoch_queue_starts=100", "moco.queue_length=8", "train.batch_size=8",
             "train.joint_linear_probe=false"]
    train(tiny_cfg(path, tiny_data, tmp_path, *extra))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 6 * (32 // 8)
    first, last = sum(losses[1:5]) / 4, sum(losses[-4:]) / 4
    assert last < first, f"{method}: loss did not fall ({first:.4f} -> {last:.4f})"


# Resume must be exact on the DALI backend (its checkpoint holds the reader and RNG states; the
# torchvision backend resumes the sample order only, see data/torch_views.py). Each case exercises a
# state a broken resume would lose: ViT-Tiny's drop path draws from torch's RNG (without the RNG
# restore the losses part at the first resumed step), SwAV's queue is in use from step 3 (8 rows =
# 2 batches), MoCo's queue of 64 keys is still half the random start at the kill point.
RESUME_CASES = {
    "dino-vit_tiny": ("dino/vit_tiny_sslight", []),
    "dino-resnet18": ("dino/resnet18_sslight", []),
    "swav-resnet18-queue": ("swav/resnet18_sslight", ["swav.epoch_queue_starts=0", "swav.queue_length=8"]),
    "moco-resnet18": ("moco/resnet18_sslight", []),
    # two loader pipelines taking turns (4 steps each per epoch): step 6 is pipeline 1's turn
    "dino-resnet18-2pipelines": ("dino/resnet18_sslight", ["data.pipelines=2", "data.num_threads=2"]),
    # a one-pipeline checkpoint (as every run before data.pipelines=auto wrote) resumed with auto,
    # which would choose 2 on this CPU with 2 threads: it keeps 1
    "dino-resnet18-1pipeline-resumed-auto": ("dino/resnet18_sslight", ["data.pipelines=1", "data.num_threads=2"],
                                             ["data.pipelines=auto"]),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_reproduces_the_uninterrupted_run(case, tiny_data, tmp_path):
    name, extra, *resume_extra = RESUME_CASES[case]
    resume_extra = [*extra, *(resume_extra[0] if resume_extra else [])]
    path = REPO / f"configs/{name}.yaml"
    # 32 images / batch 4 = 8 steps per epoch: stop at step 5 (mid-epoch), resume to step 11 (mid-epoch 1).
    train(tiny_cfg(path, tiny_data, tmp_path / "full", "train.max_steps=11", *extra))
    train(tiny_cfg(path, tiny_data, tmp_path / "split", "train.max_steps=5", *extra))
    assert ckpt.load(tmp_path / "split" / "checkpoint.pt")["step"] == 5
    train(tiny_cfg(path, tiny_data, tmp_path / "split", "train.max_steps=11", "resume=auto", *resume_extra))
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 12))
    assert split == full  # exactly: the same batches, draws and arithmetic
    # The final states, bit for bit: student, teacher/key encoder, DINO center, queues, optimizer.
    a, b = (ckpt.load(tmp_path / run / "checkpoint.pt") for run in ("full", "split"))
    assert a["step"] == b["step"] == 11
    for key in ("model", "optimizer", "method_rank", "rng"):
        assert_same_state(a[key], b[key], key)
    assert b["loader"]["pipelines"] == a["loader"]["pipelines"] and b["config"]["data"] == a["config"]["data"]
    if case.startswith("swav"):
        assert int(a["model"]["queue_filled"]) == 8 and a["model"]["queue"].abs().sum() > 0


def test_checkpoint_write_is_atomic(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_cfg(REPO / "configs/dino/resnet18_sslight.yaml", tiny_data, tmp_path, "train.max_steps=2")
    train(cfg)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"x": torch.zeros(3)}, tmp_path / "checkpoint.pt")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    state = ckpt.load(tmp_path / "checkpoint.pt")  # weights_only=True load of everything we store
    assert state["step"] == 2 and "loader" in state and "rng" in state and state["config"]["method"] == "dino"


def test_non_finite_loss_stops_without_a_checkpoint(tiny_data, tmp_path):
    from sslight_dali.data import build_train_loader
    cfg = tiny_cfg(REPO / "configs/dino/resnet18_sslight.yaml", tiny_data, tmp_path, "train.max_steps=4",
                   "train.log_every=2")
    loader = build_train_loader(cfg, channels_last=False)
    trainer = Trainer(cfg, loader, output_dir=tmp_path)
    real_forward = trainer.method.forward

    def nan_forward(views, labels, epoch):
        loss, metrics = real_forward(views, labels, epoch)
        return loss * float("nan"), metrics

    trainer.model = nan_forward
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        trainer.fit()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_missing_resume_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    cfg = tiny_cfg(REPO / "configs/dino/resnet18_sslight.yaml", tiny_data, tmp_path,
                   f"train.resume={tmp_path}/nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        train(cfg)


# --- two processes, gloo ------------------------------------------------------------------------
def _ddp_worker(rank, world, port, cfg_path, data_root, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sslight_dali.data import build_train_loader
    from sslight_dali.runtime import init_distributed
    cfg = tiny_cfg(cfg_path, data_root, out, "train.max_steps=3")
    rank, world, device = init_distributed(cfg)
    seen = [int(i) for _, _, idx in build_train_loader(cfg, rank=rank, world_size=world).epoch(0) for i in idx]
    loader = build_train_loader(cfg, rank=rank, world_size=world, channels_last=False)
    trainer = Trainer(cfg, loader, rank, world, device, Path(out))
    trainer.fit()
    torch.save({"params": {k: v.detach().clone() for k, v in trainer.method.state_dict().items()},
                "seen": seen, "steps_per_epoch": loader.steps_per_epoch},
               Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical_on_sharded_data(tiny_data, tmp_path):
    cfg_path = str(REPO / "configs/dino/resnet18_sslight.yaml")
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg_path, str(tiny_data), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # 32 images over 2 ranks of batch 4: 4 steps per epoch each, disjoint shards covering the data.
    assert r0["steps_per_epoch"] == r1["steps_per_epoch"] == 4
    assert set(r0["seen"]).isdisjoint(r1["seen"])
    assert sorted(r0["seen"] + r1["seen"]) == list(range(32))
    # Parameters, the DINO center and queues agree; BN running statistics are per process on CPU
    # (SyncBatchNorm is CUDA-only), so they are the one state allowed to differ.
    for k, v in r0["params"].items():
        if v.is_floating_point() and "running_" not in k:
            assert torch.equal(v, r1["params"][k]), f"{k} differs across ranks"
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 3


def test_resume_with_a_different_shape_names_the_key(tiny_data, tmp_path):
    path = REPO / "configs/dino/resnet18_sslight.yaml"
    train(tiny_cfg(path, tiny_data, tmp_path, "train.max_steps=2"))
    with pytest.raises(ckpt.CheckpointError, match=r"train\.batch_size is 4 in the checkpoint but 8 now"):
        train(tiny_cfg(path, tiny_data, tmp_path, "train.max_steps=4", "train.batch_size=8", "resume=auto"))


def test_auto_pipelines_are_recorded_and_an_explicit_other_count_is_refused(tiny_data, tmp_path):
    # auto on this CPU with 2 threads runs 2 pipelines and says so in config.yaml and the checkpoint;
    # a resume with an explicit other count is refused in one line naming the checkpoint's count.
    from sslight_dali.data.sources import DataError
    path = REPO / "configs/dino/resnet18_sslight.yaml"
    train(tiny_cfg(path, tiny_data, tmp_path, "train.max_steps=2", "data.num_threads=2"))
    state = ckpt.load(tmp_path / "checkpoint.pt")
    assert state["loader"]["pipelines"] == state["config"]["data"]["pipelines"] == 2
    assert load_config(tmp_path / "config.yaml").data.pipelines == 2
    with pytest.raises(DataError, match="saved with data.pipelines=2 and this run has 1: resume with data.pipelines=2"):
        train(tiny_cfg(path, tiny_data, tmp_path, "train.max_steps=4", "data.num_threads=2", "data.pipelines=1",
                       "resume=auto"))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from sslight_dali.cli import main
    rc = main(["train", str(REPO / "configs/dino/resnet18_sslight.yaml"), f"data.root={tmp_path}/missing",
               f"train.output_dir={tmp_path}/out", "train.device=cpu", "data.device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sslight: error:") and "missing" in err and "Traceback" not in err


def test_a_moco_checkpoint_from_before_the_ema_moved_resumes_one_update_later(tiny_data, tmp_path):
    # MoCo's key-encoder EMA runs after the optimizer step; earlier checkpoints (and the reference's)
    # were written with it at the start of the next forward, so they hold the key encoder one update
    # behind. Resuming one (no "ema_after_step") applies that update once; a new one is taken as is.
    import copy

    from sslight_dali.data import build_train_loader
    from sslight_dali.methods.common import ema_update_
    cfg = tiny_cfg(REPO / "configs/moco/resnet18_sslight.yaml", tiny_data, tmp_path, "train.max_steps=2")
    trainer = Trainer(cfg, build_train_loader(cfg, channels_last=False), output_dir=tmp_path / "a")
    trainer.fit()
    state = copy.deepcopy(trainer.state_dict())
    assert state["ema_after_step"] is True
    updated = copy.deepcopy(trainer.method.encoder_k)
    ema_update_(updated, trainer.method.encoder_q, cfg.moco.momentum)
    for old, want in ((False, trainer.method.encoder_k), (True, updated)):
        resumed = Trainer(cfg, build_train_loader(cfg, channels_last=False), output_dir=tmp_path / f"b{old}")
        resumed.load_state_dict({k: v for k, v in state.items() if not (old and k == "ema_after_step")})
        assert_same_state(resumed.method.encoder_k.state_dict(), want.state_dict())
        assert not torch.equal(updated.state_dict()["backbone.conv1.weight"],
                               trainer.method.encoder_k.state_dict()["backbone.conv1.weight"])  # the update moves it
