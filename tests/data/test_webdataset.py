"""WebDataset tar shards on the DALI backend: the loader interface, epochs, sharding and resume of the
file reader, with sample indices mapped back from DALI's source_info."""
import io
import tarfile

import pytest
import torch

from sslight_dali.data import build_eval_loader, build_train_loader, list_samples

WDS = ("data.format=webdataset", "data.backend=dali", "data.skip_bad_files=true")


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory, synth_root):
    """train: 3 shards of 11/11/10 samples keyed by the ImageFolder index (+ one truncated JPEG and a
    stray member that must be skipped); val: one `val-0000.tar` at the root."""
    root = tmp_path_factory.mktemp("wds")
    (root / "train").mkdir()
    ref = list_samples(synth_root, "train")
    for shard in range(3):
        with tarfile.open(root / "train" / f"{shard:04d}.tar", "w") as tar:
            for i in range(shard, len(ref), 3):
                _add(tar, f"{i:06d}.jpg", ref.read_bytes(i))
                _add(tar, f"{i:06d}.cls", str(ref.labels[i]).encode())
                _add(tar, f"{i:06d}.json", b"{}")
            if shard == 1:
                _add(tar, "bad.jpg", ref.read_bytes(0)[:300])
                _add(tar, "bad.cls", b"0")
    val = list_samples(synth_root, "val")
    with tarfile.open(root / "val-0000.tar", "w") as tar:
        for i in range(len(val)):
            _add(tar, f"{i:06d}.jpg", val.read_bytes(i))
            _add(tar, f"{i:06d}.cls", str(val.labels[i]).encode())
    return root


@pytest.fixture
def wds_cfg(make_cfg, wds_root):
    return lambda *o: make_cfg(*WDS, *o, root=wds_root)


def _index(batches):
    return torch.cat([b[2] for b in batches]).tolist()


def test_epochs_labels_and_indices(wds_cfg, wds_root, synth_root):
    # one pipeline: 5 batches of 6 (the default data.pipelines=auto runs 2 here: 2 x 2 batches)
    loader = build_train_loader(wds_cfg("train.batch_size=6", "data.pipelines=1"))
    assert loader.num_samples == 32 and loader.steps_per_epoch == 5  # the bad sample is not read
    samples, ref = list_samples(wds_root, "train", "webdataset", skip_bad_files=True), list_samples(synth_root, "train")
    orders = []
    for e in range(3):
        batches = list(loader.epoch(e))
        assert len(batches) == 5
        assert len(set(_index(batches))) == 30
        orders.append(_index(batches))
        for views, labels, index in batches:
            assert labels.dtype == torch.int64 and index.dtype == torch.int64
            assert views[0].shape == (6, 3, 32, 32)
            # The label is that of the sample's own .cls member (keys are ImageFolder indices).
            keys = [int(samples.files[i].rpartition(":")[2].split(".")[0]) for i in index.tolist()]
            assert labels.tolist() == [ref.labels[k] for k in keys] == [samples.labels[i] for i in index.tolist()]
    assert orders[0] != orders[1] != orders[2]


def test_two_shards_cover_every_epoch_once(wds_cfg):
    cfg = wds_cfg("train.batch_size=4")
    loaders = [build_train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    for e in range(2):
        seen = []
        for loader in loaders:
            batches = list(loader.epoch(e))
            assert len(batches) == loader.steps_per_epoch == 4
            seen += _index(batches)
        assert sorted(seen) == list(range(32)), f"epoch {e}"


@pytest.mark.parametrize("consumed", [1, 4])
def test_resume_gives_identical_next_batch(wds_cfg, consumed):
    # consumed=4 is the epoch end: the next batch is the first of epoch 1 (tars reshuffled).
    cfg = wds_cfg("data.prefetch=2")
    loader = build_train_loader(cfg)
    it = loader.epoch(0)
    for _ in range(consumed):
        next(it)
    if consumed == loader.steps_per_epoch:
        assert list(it) == []
        state = loader.state_dict()
        expected = next(iter(loader.epoch(1)))
    else:
        state = loader.state_dict()
        expected = next(it)
    fresh = build_train_loader(cfg)
    fresh.load_state_dict(state)
    got_it = fresh.epoch(state["epoch"])
    got = next(got_it)
    assert torch.equal(got[2], expected[2]) and all(torch.equal(a, b) for a, b in zip(got[0], expected[0]))
    assert 1 + len(list(got_it)) == fresh.steps_per_epoch - state["step"]


def test_eval_every_sample_once_and_pixels_match_torchvision(wds_cfg):
    cfg = wds_cfg("eval.batch_size=5")  # 12 val images over 2 ranks: partial last batches
    seen = []
    for rank in range(2):
        batches = list(build_eval_loader(cfg, rank=rank, world_size=2).epoch(0))
        seen += _index(batches)
    assert sorted(seen) == list(range(12))
    # The index names the image actually decoded: same pixels as the torchvision reader's sample.
    a = next(iter(build_eval_loader(cfg)))
    b = next(iter(build_eval_loader(wds_cfg("data.backend=torchvision", "data.num_threads=1", "eval.batch_size=5"))))
    assert torch.equal(a[2], b[2]) and torch.equal(a[1], b[1])
    assert (a[0] - b[0]).abs().mean() < 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_webdataset(wds_cfg):
    cfg = wds_cfg("data.device=gpu", "train.batch_size=4")
    loaders = [build_train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader in loaders:
        batches = list(loader.epoch(0))
        assert len(batches) == loader.steps_per_epoch == 4
        views, labels, index = batches[0]
        assert views[0].is_cuda and labels.is_cuda and index.is_cuda
        seen += _index(batches)
    assert sorted(seen) == list(range(32))
