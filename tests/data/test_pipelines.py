"""Several DALI pipelines per process (data.pipelines): shards, turns, epochs, exact resume, errors."""
import pytest
import torch

from sslight_dali.data import build_eval_loader, build_train_loader
from sslight_dali.data.build import resolve_pipelines
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
    one = make_cfg("train.batch_size=4", "data.pipelines=1")
    perm = torch.cat([b[2] for b in _epoch(build_train_loader(one), 0)]).tolist()
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
    one = build_train_loader(make_cfg("train.batch_size=4", "data.pipelines=1"))
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


@pytest.mark.parametrize("pipelines,world_size", [(1, 2), (2, 1), (2, 2)])
def test_uneven_shards_run_the_steps_they_promise(make_cfg, tmp_path, pipelines, world_size):
    # 31 images, batch 8: shards of 15 and 16 (or 7 and 8) images. DALI runs every shard for the
    # shortest one's full batches; steps_per_epoch said ceil(31 / 2) // 8 = 2 where DALI ran 1, and the
    # epoch ended in "DALI epoch ran 1 steps, expected 2" (with one pipeline too, over 2 processes).
    from sslight_dali.synth import synth_dataset
    synth_dataset(tmp_path, classes=1, per_class=31, val_per_class=1, seed=0, min_side=40, max_side=48)
    cfg = make_cfg(f"data.pipelines={pipelines}", "train.batch_size=8" if world_size * pipelines == 2 else
                   "train.batch_size=3", root=tmp_path)
    for rank in range(world_size):
        loader = build_train_loader(cfg, rank=rank, world_size=world_size)
        shards = world_size * pipelines
        assert loader.steps_per_epoch == pipelines * (31 // shards // cfg.train.batch_size)
        for e in range(2):
            assert len(_epoch(loader, e)) == loader.steps_per_epoch


def test_a_loader_state_from_another_graph_is_one_line(make_cfg):
    # A checkpoint written by another version (its graph had other operators: here the random-order
    # chain's) cannot restore DALI's operator states; the error says so in one line.
    state = build_train_loader(make_cfg("recipe.augment.jitter_order=random")).state_dict()
    with pytest.raises(DataError, match="does not fit this version's view-sampling graph") as e:
        build_train_loader(make_cfg()).load_state_dict(state)
    assert "\n" not in str(e.value)


def test_auto_pipelines():
    # auto: 1 where the DALI pipeline runs on the GPU; on the CPU 2 with at least 2 threads, else 1.
    # An integer is kept as given.
    assert resolve_pipelines("auto", "cpu", 2) == 2 and resolve_pipelines("auto", "cpu", 8) == 2
    assert resolve_pipelines("auto", "cpu", 1) == 1
    assert resolve_pipelines("auto", "gpu", 1) == resolve_pipelines("auto", "gpu", 8) == 1
    assert resolve_pipelines(1, "cpu", 8) == 1 and resolve_pipelines(3, "gpu", 4) == 3
    # and only where each pipeline gets a full batch of the process's samples (32 / 2 = 16)
    assert resolve_pipelines("auto", "cpu", 2, 32, 16) == 2 and resolve_pipelines("auto", "cpu", 2, 31, 16) == 1
    assert resolve_pipelines(2, "cpu", 2, 31, 16) == 2  # an explicit count is refused by the loader instead


def test_auto_is_resolved_where_the_training_loader_is_built(make_cfg):
    # The default is auto: 2 on this CPU graph with 2 threads, written back into the config the run
    # saves; the probe / eval loaders keep one pipeline.
    cfg = make_cfg("train.batch_size=4")
    assert cfg.data.pipelines == "auto"
    loader = build_train_loader(cfg)
    assert loader.pipelines == 2 and cfg.data.pipelines == 2 and len(loader.state_dict()["dali"]) == 2
    one = make_cfg("train.batch_size=4", "data.num_threads=1")
    assert build_train_loader(one).pipelines == 1 and one.data.pipelines == 1
    big = make_cfg("train.batch_size=20")  # 32 samples: 16 per pipeline would be less than a batch
    assert build_train_loader(big).pipelines == 1 and big.data.pipelines == 1
    assert build_train_loader(make_cfg("train.batch_size=8"), rank=1, world_size=2).pipelines == 2  # 16 per rank
    assert build_train_loader(make_cfg("train.batch_size=9"), rank=1, world_size=2).pipelines == 1
    probe = build_eval_loader(make_cfg("train.batch_size=4"), "train", train_augment=True, batch_size=4, drop_last=True)
    assert probe.loader.pipelines == 1
    assert build_train_loader(make_cfg(), drop_last=False).pipelines == 1
