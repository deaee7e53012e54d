"""The GPU graph (mixed decoder, GPU operators): same code as the CPU graph, checked on CUDA only."""
import pytest
import torch

from sslight_dali.data import build_eval_loader, build_train_loader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_train_views(make_cfg):
    cfg = make_cfg("data.device=gpu", "data.dtype=bfloat16")
    loader = build_train_loader(cfg)
    assert loader.device == "gpu"
    for e in range(2):
        batches = list(loader.epoch(e))
        assert len(batches) == loader.steps_per_epoch
    views, labels, index = batches[0]
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 6
    assert all(v.is_cuda and v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
               for v in views)
    assert labels.is_cuda and labels.dtype == torch.int64 and torch.equal(labels, index // 8)
    x = torch.cat([v.float().flatten() for v in views])
    assert torch.isfinite(x).all() and -1.5 < x.mean() < 1.5 and 0.3 < x.std() < 2.0


def test_gpu_matches_cpu_statistics(make_cfg):
    # Same recipe on both devices: per-channel means of many views agree to a loose tolerance.
    means = {}
    for dev in ("cpu", "gpu"):
        loader = build_train_loader(make_cfg(f"data.device={dev}"))
        xs = [torch.stack([v.float().mean(dim=(0, 2, 3)) for v in views]).cpu()
              for e in range(4) for views, _, _ in loader.epoch(e)]
        means[dev] = torch.stack(xs).mean(dim=(0, 1))
    assert (means["cpu"] - means["gpu"]).abs().max() < 0.15, means


def test_gpu_resume_and_eval(make_cfg):
    cfg = make_cfg("data.device=gpu")
    loader = build_train_loader(cfg)
    it = loader.epoch(0)
    next(it)
    state = loader.state_dict()
    expected = next(it)
    fresh = build_train_loader(cfg)
    fresh.load_state_dict(state)
    got = next(fresh.epoch(0))
    assert torch.equal(got[2], expected[2]) and all(torch.equal(a, b) for a, b in zip(got[0], expected[0]))
    images, labels, index = next(iter(build_eval_loader(cfg)))
    assert images.is_cuda and images.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_batch_arrives_without_waiting_for_the_gpu(make_cfg, backend):
    # Nothing in a loader's next() may wait for the GPU: a blocking copy there (of the labels, once)
    # made every step wait for the previous step's kernels, and the bench counted that as data wait.
    loader = build_train_loader(make_cfg("data.device=gpu", f"data.backend={backend}"))
    it = loader.epoch(0)
    next(it)
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call in torch raises
    try:
        views, labels, index = next(it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert views[0].is_cuda and labels.is_cuda and index.is_cuda and torch.equal(labels, index // 8)
