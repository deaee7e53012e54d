"""`sslight embed`: the eval-view features `sslight eval knn` uses, one row per image in dataset order.

- kNN computed here from the written arrays (knn_classify) equals `sslight eval knn` on the same checkpoint;
- row i is image paths[i]: each row equals the backbone's feature of the batch row the eval loader gives for
  sample index i, and a file list in another order gives the rows in its order;
- WebDataset shards give the same rows in their own order; a folder without labels (data.format=folder)
  gives the same features, without labels;
- two gloo processes give the one-process file;
- bad input: one line, exit 2, nothing written.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sslight_dali import checkpoint as ckpt
from sslight_dali.cli import main
from sslight_dali.config import to_dict
from sslight_dali.run_config import load_config
from sslight_dali.data import list_samples
from sslight_dali.methods import build_method

TINY = ["dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.num_threads=1", "data.device=cpu",
        "train.device=cpu", "eval.resize=40", "eval.crop=32", "eval.batch_size=5", "train.tensorboard=false"]


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth_root):
    """A DINO ResNet18 checkpoint (no training: random weights, BN statistics away from (0, 1)) on synth_root."""
    path = tmp_path_factory.mktemp("embed") / "run" / ckpt.LATEST
    cfg = load_config("configs/dino/resnet18_sslight.yaml", TINY + [f"data.root={synth_root}"])
    torch.manual_seed(0)
    method = build_method(cfg, 0)
    with torch.no_grad():
        for m in method.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    ckpt.save_atomic({"model": method.state_dict(), "config": to_dict(cfg), "epoch": 2, "step": 8}, path)
    return path


def read(path):
    with np.load(path) as z:  # allow_pickle=False: everything is a plain array
        return {k: z[k] for k in z.files}


def test_knn_from_the_embeddings_equals_eval_knn(checkpoint, synth_root, tmp_path):
    from sslight_dali.knn import knn_classify
    mode = ["eval.knn_mode=train_val", "eval.knn_k=5"]
    assert run("eval", "knn", checkpoint, "--out", tmp_path / "knn", *mode) == 0
    want = json.loads((tmp_path / "knn" / "eval_knn.json").read_text())
    for split in ("train", "val"):
        assert run("embed", checkpoint, "--out", tmp_path / f"{split}.npz", "--split", split) == 0
    train, val = read(tmp_path / "train.npz"), read(tmp_path / "val.npz")
    got = knn_classify(*(torch.from_numpy(a) for a in (train["features"], train["labels"], val["features"],
                                                        val["labels"])), k=5, temperature=want["temperature"])
    assert (got["top1"], got["top5"], got["n"]) == (want["top1"], want["top5"], want["val_images"])
    assert 0 < want["top1"] < 100  # not a degenerate case that any features would reproduce
    samples = list_samples(synth_root, "val")
    assert list(val["paths"]) == samples.files and list(val["labels"]) == samples.labels
    assert list(val["classes"]) == samples.classes and val["features"].dtype == np.float32
    meta = json.loads(str(val["meta"]))
    assert (meta["backbone"], meta["crop"], meta["images"], meta["labelled"]) == ("resnet18", 32, 12, True)


@torch.no_grad()
def test_rows_are_in_dataset_order(checkpoint, synth_root, tmp_path):
    """Row i = the feature of sample index i as the eval loader delivers it; a file list in reverse order gives
    the rows reversed (with its labels)."""
    from sslight_dali.data import build_eval_loader
    from sslight_dali.pretrained import load_pretrained
    assert run("embed", checkpoint, "--out", tmp_path / "val.npz") == 0
    rows = read(tmp_path / "val.npz")["features"]
    pre = load_pretrained(checkpoint)
    by_index = {}
    for images, _, idx in build_eval_loader(pre.cfg, "val", channels_last=False):
        for f, i in zip(pre.backbone(images), idx.tolist()):
            by_index[i] = f.numpy()
    np.testing.assert_allclose(rows, np.stack([by_index[i] for i in range(len(rows))]), rtol=0, atol=1e-5)

    samples = list_samples(synth_root, "val")
    listed = tmp_path / "list"
    listed.mkdir()
    (listed / "val.txt").write_text("".join(f"{f} {y}\n" for f, y in zip(samples.files[::-1], samples.labels[::-1])))
    assert run("embed", checkpoint, "--out", tmp_path / "list.npz", f"data.root={listed}", "data.format=filelist") == 0
    got = read(tmp_path / "list.npz")
    assert list(got["paths"]) == samples.files[::-1] and list(got["labels"]) == samples.labels[::-1]
    np.testing.assert_allclose(got["features"], rows[::-1], rtol=0, atol=1e-5)


def test_webdataset_shards_give_the_imagefolder_rows(checkpoint, synth_root, tmp_path):
    import io
    import tarfile
    samples = list_samples(synth_root, "val")
    order = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]  # keys sort into this order, not the ImageFolder one
    with tarfile.open(tmp_path / "val-0000.tar", "w") as tar:
        for key, i in enumerate(order):
            members = {f"{key:04d}.jpg": samples.read_bytes(i), f"{key:04d}.cls": str(samples.labels[i]).encode()}
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert run("embed", checkpoint, "--out", tmp_path / "folder.npz") == 0
    assert run("embed", checkpoint, "--out", tmp_path / "wds.npz", f"data.root={tmp_path}",
               "data.format=webdataset") == 0
    ref, wds = read(tmp_path / "folder.npz"), read(tmp_path / "wds.npz")
    assert list(wds["paths"]) == [f"{tmp_path / 'val-0000.tar'}:{k:04d}.jpg" for k in range(12)]
    assert list(wds["labels"]) == [samples.labels[i] for i in order]
    np.testing.assert_allclose(wds["features"], ref["features"][order], rtol=0, atol=1e-5)


def test_a_folder_without_labels(checkpoint, synth_root, tmp_path):
    assert run("embed", checkpoint, "--out", tmp_path / "labelled.npz") == 0
    assert run("embed", checkpoint, "--out", tmp_path / "folder.npz", "data.format=folder") == 0
    labelled, folder = read(tmp_path / "labelled.npz"), read(tmp_path / "folder.npz")
    assert "labels" not in folder and "classes" not in folder and not json.loads(str(folder["meta"]))["labelled"]
    assert list(folder["paths"]) == list(labelled["paths"])  # the same images, sorted by path
    np.testing.assert_array_equal(folder["features"], labelled["features"])


@pytest.mark.slow
def test_two_gloo_processes_write_the_one_process_rows(checkpoint, tmp_path):
    import torch.multiprocessing as mp
    from helpers import cli_worker as _eval_worker, free_port as _free_port
    assert run("embed", checkpoint, "--out", tmp_path / "one.npz", "--split", "train") == 0
    argv = ["embed", str(checkpoint), "--out", str(tmp_path / "two.npz"), "--split", "train"]
    mp.spawn(_eval_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
    one, two = read(tmp_path / "one.npz"), read(tmp_path / "two.npz")
    assert list(two["paths"]) == list(one["paths"]) and list(two["labels"]) == list(one["labels"])
    np.testing.assert_allclose(two["features"], one["features"], rtol=0, atol=1e-5)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(checkpoint, tmp_path, capsys):
    pyarrow = True
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pyarrow = False
    cases = [(["--out", tmp_path / "e.txt"], "must end in .npz or .parquet"),
             (["--out", tmp_path / "e.npz", f"data.root={tmp_path / 'none'}"], "none"),
             (["--out", tmp_path / "e.npz", "--split", "test"], "test"),
             (["--out", tmp_path / "e.npz", "data.rot=x"], "did you mean"),
             (["--out", "/proc/sslight_embed.npz"], "/proc/sslight_embed.npz"),
             (["--out", tmp_path / "e.npz", "data.format=webdataset"], "WebDataset")]
    if not pyarrow:
        cases.append((["--out", tmp_path / "e.parquet"], "needs the Python package 'pyarrow': pip install pyarrow"))
    for argv, needle in cases:
        assert run("embed", checkpoint, *argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("sslight: ") and "\n" not in err and needle in err, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_parquet_holds_the_npz_rows(checkpoint, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    assert run("embed", checkpoint, "--out", tmp_path / "e.npz") == 0
    assert run("embed", checkpoint, "--out", tmp_path / "e.parquet") == 0
    table, ref = pq.read_table(tmp_path / "e.parquet"), read(tmp_path / "e.npz")
    assert table.column("path").to_pylist() == list(ref["paths"])
    assert table.column("label").to_pylist() == list(ref["labels"])
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), np.float32), ref["features"])
    assert json.loads(table.schema.metadata[b"sslight"])["images"] == len(ref["paths"])
