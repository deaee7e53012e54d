"""Two gloo processes against one: what a multi-GPU run must share, and what it must keep per rank.

- at set-up every rank holds the same method state (parameters and every buffer: MoCo's random queue
  included, although ranks are seeded seed + rank);
- DINO's center, SwAV's Sinkhorn codes and MoCo's queue update computed by 2 processes, each on its
  half of a batch, equal one process's computation on the whole batch;
- a 2-process SwAV run (queue active) and MoCo run interrupted mid-epoch and resumed end in exactly
  the state of the uninterrupted run, on every rank (SwAV's queues are per rank).
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sslight_dali import checkpoint as ckpt
from sslight_dali.run_config import load_config

from helpers import assert_same_state, free_port as _free_port

REPO = Path(__file__).resolve().parent.parent
TINY = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=4",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
        "swav.num_prototypes=16", "swav.hidden_dim=32", "swav.out_dim=16", "moco.queue_length=64",
        "moco.hidden_dim=32", "moco.out_dim=16", "data.num_threads=1", "train.knn_every=0", "train.log_every=1",
        "train.device=cpu", "data.device=cpu", "train.tensorboard=false"]


def _cfg(method, *extra, backbone="resnet18"):
    return load_config(REPO / f"configs/{method}/{backbone}_sslight.yaml", TINY + list(extra))


def _join(rank, world, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _spawn(worker, *args):
    mp.spawn(worker, args=(2, _free_port(), *args), nprocs=2, join=True)


# --- state at set-up ------------------------------------------------------------------------------
def _setup_worker(rank, world, port, out):
    _join(rank, world, port)
    from sslight_dali.runtime import init_distributed, seed_everything
    from sslight_dali.train import Trainer
    states = {}
    for method in ("dino", "swav", "moco"):
        cfg = _cfg(method, f"train.output_dir={out}/{method}")
        init_distributed(cfg)
        seed_everything(cfg.train.seed + rank)  # as train() does: every rank draws differently
        loader = types.SimpleNamespace(steps_per_epoch=4, num_classes=4)
        trainer = Trainer(cfg, loader, rank, world, torch.device("cpu"), Path(out) / method)
        states[method] = {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}
    torch.save(states, Path(out) / f"setup{rank}.pt")
    from sslight_dali.methods import build_method
    from sslight_dali.methods.swav import distributed_sinkhorn
    torch.save(_stats(build_method, distributed_sinkhorn, rank, world), Path(out) / f"stats{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process spawn for the set-up states and the statistics (it costs most of the time)."""
    out = tmp_path_factory.mktemp("two_ranks")
    _spawn(_setup_worker, str(out))
    return out


@pytest.mark.slow
def test_every_rank_starts_from_the_same_method_state(two_ranks):
    r0, r1 = (torch.load(two_ranks / f"setup{r}.pt", weights_only=True) for r in (0, 1))
    for method in ("dino", "swav", "moco"):
        assert r0[method].keys() == r1[method].keys()
        # Parameters (DDP's start-up broadcast) and every buffer: DINO center, SwAV queue, MoCo queue,
        # BN statistics. A MoCo queue drawn per rank differs everywhere (random unit vectors).
        differ = [k for k, v in r0[method].items() if not torch.equal(v, r1[method][k])]
        assert differ == [], f"{method}: {differ} differ across ranks at set-up"
    assert r0["moco"]["queue"].abs().sum() > 0  # the queue is the random start, not zeros


# --- distributed statistics against one process on the whole batch --------------------------------
def _global_batch(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _stats(build_method, distributed_sinkhorn, rank, world):
    """DINO center after two updates, SwAV codes, MoCo queue after two enqueues: this rank's half (or
    the whole batch when world == 1)."""
    n = 8 // world
    rows = slice(rank * n, (rank + 1) * n)
    dino = build_method(_cfg("dino"), 0)
    for seed in (1, 2):
        dino.update_center(_global_batch(seed, 8, 64)[rows])
    scores = _global_batch(3, 8, 16)
    codes = distributed_sinkhorn(scores[rows], epsilon=0.05, iterations=3)
    moco = build_method(_cfg("moco"), 0)
    moco.queue.zero_()
    for seed in (4, 5):
        # 8 global keys x 2 enqueues = 16 of the 64 queue columns; rank r's keys are rows r*n..r*n+n.
        moco.enqueue(_global_batch(seed, 8, 16)[rows])
    return {"center": dino.center.clone(), "codes": codes, "queue": moco.queue.clone(), "ptr": moco.queue_ptr.clone()}


@pytest.mark.slow
def test_dino_center_sinkhorn_and_moco_queue_with_two_processes_equal_one(two_ranks):
    from sslight_dali.methods import build_method
    from sslight_dali.methods.swav import distributed_sinkhorn
    one = _stats(build_method, distributed_sinkhorn, 0, 1)
    two = [torch.load(two_ranks / f"stats{r}.pt", weights_only=True) for r in (0, 1)]
    for r in (0, 1):
        # Sums of 8 float32 rows in another order: equal to a few ulps, not bitwise.
        torch.testing.assert_close(two[r]["center"], one["center"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(two[r]["queue"], one["queue"], rtol=0, atol=0)
        assert int(two[r]["ptr"]) == int(one["ptr"]) == 16
    # Each rank's codes are its rows of the whole batch's codes (normalised over both ranks).
    torch.testing.assert_close(torch.cat([two[0]["codes"], two[1]["codes"]]), one["codes"], rtol=1e-5, atol=1e-7)
    # What a per-rank statistic would give instead (the margins these tolerances must stay below):
    half = distributed_sinkhorn(_global_batch(3, 8, 16)[:4], epsilon=0.05, iterations=3)
    assert (half - one["codes"][:4]).abs().max() > 1e-3


# --- interrupted and resumed 2-process runs ---------------------------------------------------------
RESUME_RUNS = {
    # SwAV: queue active from epoch 0; 16 rounds to 8 rows per rank = 2 steps, so it is in use from step 3.
    "swav": ["swav.epoch_queue_starts=0", "swav.queue_length=16"],
    # MoCo: 64 keys = 8 steps of 2 x 4 keys, so the start queue is partly overwritten across the resume.
    "moco": [],
}


def _resume_worker(rank, world, port, data_root, out, ports):
    _join(rank, world, port)
    import sslight_dali.train as T
    fit = T.Trainer.fit

    def fit_and_keep(self):
        result = fit(self)
        torch.save({"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "step": self.step}, self.output_dir / f"final{self.rank}.pt")
        return result

    T.Trainer.fit = fit_and_keep
    runs = [(method, [f"data.root={data_root}", *extra, *run]) for method, extra in RESUME_RUNS.items() for run in (
        # 32 images / 2 ranks / batch 4 = 4 steps per epoch: stop at step 3 (mid-epoch 0), go on to 7.
        [f"train.output_dir={out}/{method}/full", "train.max_steps=7"],
        [f"train.output_dir={out}/{method}/split", "train.max_steps=3"],
        [f"train.output_dir={out}/{method}/split", "train.max_steps=7", "resume=auto"])]
    for (method, overrides), run_port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(run_port)  # train() ends its process group; the next starts afresh
        T.train(_cfg(method, *overrides))


@pytest.mark.slow
def test_two_process_swav_and_moco_resume_exactly_on_every_rank(tiny_data, tmp_path):
    _spawn(_resume_worker, str(tiny_data), str(tmp_path), [_free_port() for _ in range(3 * len(RESUME_RUNS))])
    for method in RESUME_RUNS:
        for rank in (0, 1):
            full = torch.load(tmp_path / method / "full" / f"final{rank}.pt", weights_only=True)
            split = torch.load(tmp_path / method / "split" / f"final{rank}.pt", weights_only=True)
            assert full["step"] == split["step"] == 7
            assert_same_state(full, split, f"{method} rank {rank}")
        if method == "swav":
            q0, q1 = (torch.load(tmp_path / method / "full" / f"final{r}.pt", weights_only=True)["model"]
                      for r in (0, 1))
            assert int(q0["queue_filled"]) == 8 and q0["queue"].abs().sum() > 0
            assert not torch.equal(q0["queue"], q1["queue"])  # per-rank queues: the test above can tell them apart
        saved = ckpt.load(tmp_path / method / "split" / "checkpoint.pt")
        assert saved["step"] == 7 and len(saved["method_rank"]["per_rank"]) == 2
        losses = [{r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / method / run / "metrics.jsonl"))
                   if r["kind"] == "train"} for run in ("full", "split")]
        assert losses[0] == losses[1] and sorted(losses[0]) == list(range(1, 8))  # exactly, not approx


# --- the file check at start -----------------------------------------------------------------------
def _slow_check_worker(rank, world, port, data_root, out):
    _join(rank, world, port)
    import time

    from sslight_dali.data import base
    from sslight_dali.runtime import init_distributed
    cfg = _cfg("dino", f"data.root={data_root}", "train.dist_timeout_s=10", "data.verify_cache=",
               "data.skip_bad_files=true")
    init_distributed(cfg)

    def slow_check(samples, *args):  # rank 0's first check of a large data set: longer than the timeout
        time.sleep(13)
        return [(0, "planted: not an image")]
    base.find_bad_samples_cached = slow_check
    samples = base.load_split(cfg, "train")
    torch.distributed.barrier()  # the training group is still healthy after the long wait
    (Path(out) / f"n{rank}").write_text(str(len(samples.files)))

    def failing_check(samples, *args):
        raise base.DataError("planted: the data root vanished")
    base.find_bad_samples_cached = failing_check
    try:
        base.load_split(cfg, "train")
    except base.DataError as e:  # every rank stops with rank 0's error, none is left waiting
        (Path(out) / f"err{rank}").write_text(str(e))
    torch.distributed.destroy_process_group()


def test_ranks_wait_for_a_file_check_longer_than_the_collective_timeout(tiny_data, tmp_path):
    # train.dist_timeout_s bounds the collectives of training; the other ranks must still wait for rank
    # 0's up-front file check however long it takes, and take its verdict (here one file excluded), or
    # its error.
    _spawn(_slow_check_worker, str(tiny_data), str(tmp_path))
    assert (tmp_path / "n0").read_text() == (tmp_path / "n1").read_text() == str(32 - 1)
    assert (tmp_path / "err0").read_text() == (tmp_path / "err1").read_text() == "planted: the data root vanished"
