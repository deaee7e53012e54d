"""Several DALI pipelines per process (data.pipelines): shards, turns, epochs, exact resume, errors."""
import pytest
import torch

from sslight_dali.data import build_train_loader
from sslight_dali.data.sources import DataError


def _epoch(loader, e):
    return [(views, labels, index) for views, labels, index in loader.epoch(e)]


def test_pipelines_take_turns_over_their_own_shards(make_cfg):
    # 32 samples, batch 4, 2 pipelines: each reads a contiguous half (16) of the epoch-0 permutation,
    # 4 batches each, alternating; together every sample once, every epoch.
    cfg = make_cfg("data.pipelines=2", "train.batch_size=4")
    loader = build_train_loader(cfg)
    assert loader.steps_per_epoch == 8
    # one pipeline's epoch-0 order: pipeline j's shard is its j-th half
    perm = torch.cat([b[2] for b in _epoch(build_train_loader(make_cfg("train.batch_size=4")), 0)]).tolist()
    halves = [set(perm[:16]), set(perm[16:])]
    orders = []
    for e in range(3):
        batches = _epoch(loader, e)
        assert len(batches) == 8
        index = torch.cat([b[2] for b in batches]).tolist()
        assert sorted(index) == list(range(32)), f"epoch {e}"
        if e == 0:
            for s, b in enumerate(batches):
                assert set(b[2].tolist()) <= halves[s % 2], f"step {s} is not pipeline {s % 2}'s"
        orders.append(index)
    assert orders[0] != orders[1] != orders[2]


def test_pipelines_have_their_own_augmentation_seed(make_cfg, tmp_path):
    # 16 copies of one image: the two pipelines' first batches hold the same pixels, so they differ
    # only if the pipelines draw different random crops, jitter and flips.
    import shutil
    from pathlib import Path
    src = sorted(Path(make_cfg().data.root, "train").rglob("*.jpg"))[0]
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(16):
        shutil.copy(src, tmp_path / "train" / "a" / f"{i}.jpg")
    cfg = make_cfg("data.pipelines=2", "train.batch_size=4", root=tmp_path)
    first, second = _epoch(build_train_loader(cfg), 0)[:2]
    assert not any(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    again = _epoch(build_train_loader(cfg), 0)[:2]  # reproducible for a given seed
    for x, y in zip((first, second), again):
        assert all(torch.equal(u, v) for u, v in zip(x[0], y[0]))


@pytest.mark.parametrize("consumed", [0, 1, 3, 8])
def test_resume_with_two_pipelines_gives_the_same_batches(make_cfg, consumed):
    # 1 and 3: the turn is pipeline 1's; 8: the epoch end, the next batch is the first of epoch 1.
    cfg = make_cfg("data.pipelines=2", "train.batch_size=4", "data.prefetch=2")
    loader = build_train_loader(cfg)
    it = loader.epoch(0)
    for _ in range(consumed):
        next(it)
    if consumed == loader.steps_per_epoch:
        assert list(it) == []
        it = loader.epoch(1)
    state = loader.state_dict()
    assert state["pipelines"] == 2 and len(state["dali"]) == 2
    expected = list(it)

    fresh = build_train_loader(cfg)
    fresh.load_state_dict(state)
    got = list(fresh.epoch(state["epoch"]))
    assert len(got) == len(expected) == fresh.steps_per_epoch - state["step"]
    for g, x in zip(got, expected):
        assert torch.equal(g[2], x[2])
        assert all(torch.equal(a, b) for a, b in zip(g[0], x[0]))


def test_resume_refuses_another_pipeline_count(make_cfg):
    state = build_train_loader(make_cfg("data.pipelines=2", "train.batch_size=4")).state_dict()
    one = build_train_loader(make_cfg("train.batch_size=4"))
    with pytest.raises(DataError, match="data.pipelines=2"):
        one.load_state_dict(state)
    # and a one-pipeline state (the single-string form of earlier checkpoints) into two pipelines
    with pytest.raises(DataError, match="saved with data.pipelines=1"):
        build_train_loader(make_cfg("data.pipelines=2", "train.batch_size=4")).load_state_dict(one.state_dict())


def test_too_few_samples_per_pipeline_and_too_few_threads(make_cfg):
    # 32 samples over 2 pipelines = 16 each, fewer than a batch of 20 (one pipeline would have 32)
    with pytest.raises(DataError, match=r"data.pipelines=2 give 16 per pipeline.*use data.pipelines=1"):
        build_train_loader(make_cfg("data.pipelines=2", "train.batch_size=20"))
    with pytest.raises(DataError, match="data.pipelines=2 needs at least as many data.num_threads"):
        build_train_loader(make_cfg("data.pipelines=2", "data.num_threads=1"))
