"""Sources: formats, bad files, unusual images."""
import io
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from sslight_dali.cli import main as cli
from sslight_dali.data import DataError, build_eval_loader, build_train_loader, list_samples
from sslight_dali.data.sources import check_image


@pytest.fixture
def root(tmp_path, synth_root):
    shutil.copytree(synth_root, tmp_path / "ds")
    return tmp_path / "ds"


def _first_jpeg(root):
    return sorted((root / "train").rglob("*.jpg"))[0]


BAD = {
    "zero_bytes": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "text": lambda good: b"this is not an image\n" * 10,
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_error_names_it(root, make_cfg, kind):
    bad = root / "train" / "01_square" / f"bad_{kind}.jpg"
    bad.write_bytes(BAD[kind](_first_jpeg(root).read_bytes()))
    with pytest.raises(DataError, match=f"bad_{kind}.jpg"):
        build_train_loader(make_cfg(root=root))


def test_bad_files_skipped_and_counted(root, make_cfg, caplog):
    good = _first_jpeg(root).read_bytes()
    for kind, make in BAD.items():
        (root / "train" / "02_triangle" / f"bad_{kind}.jpg").write_bytes(make(good))
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(make_cfg("data.skip_bad_files=true", root=root))
    assert loader.num_samples == 32
    assert "skipping 3 bad image file(s)" in caplog.text and "bad_text.jpg" in caplog.text
    assert sum(len(b[2]) for b in loader.epoch(0)) == 32  # runs through a whole epoch


def test_truncated_jpeg_passes_pil_verify_but_not_our_check(synth_root):
    # PIL's verify() accepts a JPEG cut in half; DALI's CPU decoder then fails mid-epoch ("Premature
    # end of JPEG data") and leaves the pipeline unusable. Hence the end-of-image check up front.
    good = _first_jpeg(synth_root).read_bytes()
    with Image.open(io.BytesIO(good[: len(good) // 2])) as im:
        im.verify()
    assert check_image(good) is None
    assert "truncated" in check_image(good[: len(good) // 2])


def test_missing_and_empty_split(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope" / "train")):
        list_samples(tmp_path / "nope", "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        list_samples(tmp_path / "empty", "train")


def test_imagefolder_order_matches_torchvision(synth_root):
    from torchvision.datasets import ImageFolder
    ref = ImageFolder(synth_root / "train")
    s = list_samples(synth_root, "train")
    assert s.classes == ref.classes and s.files == [p for p, _ in ref.samples] and s.labels == ref.targets


def _odd_images(d):
    """Grayscale JPEG, CMYK JPEG, RGBA PNG, palette PNG, a 5x7 JPEG: all must come out 3-channel RGB."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    d.mkdir(parents=True)
    rgb.convert("L").save(d / "gray.jpg")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    rgb.convert("RGBA").save(d / "rgba.png")
    rgb.convert("P").save(d / "palette.png")
    rgb.resize((5, 7)).save(d / "tiny.jpg")
    return rgb


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_odd_images_decode_to_rgb(tmp_path, make_cfg, backend):
    for split in ("train", "val"):
        _odd_images(tmp_path / split / "a")
    cfg = make_cfg(f"data.backend={backend}", "train.batch_size=5", "eval.batch_size=5", root=tmp_path)
    views, _, _ = next(build_train_loader(cfg).epoch(0))
    assert [tuple(v.shape) for v in views][:3] == [(5, 3, 32, 32), (5, 3, 32, 32), (5, 3, 16, 16)]
    images, _, index = next(iter(build_eval_loader(cfg)))
    assert images.shape == (5, 3, 32, 32) and torch.isfinite(images).all()
    # Grayscale input stays gray after the RGB conversion (eval has no colour ops).
    gray = images[index.tolist().index(1)]  # sorted: cmyk, gray, palette, rgba, tiny
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pix = gray * std[:, None, None] + mean[:, None, None]
    assert (pix[0] - pix[1]).abs().max() < 0.02 and (pix[1] - pix[2]).abs().max() < 0.02


def test_filelist_format(tmp_path, synth_root):
    files = list_samples(synth_root, "train")
    lines = [f"{p} {l}" for p, l in zip(files.files, files.labels)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    s = list_samples(tmp_path, "train", "filelist")
    assert s.files == files.files and s.labels == files.labels and len(s.classes) == 4
    (tmp_path / "train.txt").write_text("missing.jpg 0\n")
    with pytest.raises(DataError, match="missing.jpg"):
        list_samples(tmp_path, "train", "filelist")


@pytest.mark.parametrize("label", ["-1", "1.5", "abc"])
def test_filelist_label_must_be_a_non_negative_integer(tmp_path, synth_root, label, capsys):
    files = list_samples(synth_root, "train")
    lines = ["# path label", f"{files.files[0]} 0", "", f"{files.files[1]} {label}", f"{files.files[2]} 1"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    want = f"{tmp_path / 'train.txt'}:4: label '{label}' must be a non-negative integer"
    with pytest.raises(DataError) as e:
        list_samples(tmp_path, "train", "filelist")
    assert str(e.value) == want
    # The command line: that one line and exit 2.
    rc = cli(["train", "configs/dino/resnet18_sslight.yaml", f"data.root={tmp_path}", "data.format=filelist",
              "data.device=cpu", "train.device=cpu", f"train.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.endswith(want), err


def _wds_shard(path, samples, labels):
    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            for name, data in ((f"{i:06d}.jpg", samples.read_bytes(i)), (f"{i:06d}.cls", label)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("data, shown", [(b"-1", "'-1'"), (b"1.5", "'1.5'"), (b"abc", "'abc'"),
                                         (b"\xff", "'\ufffd'")])  # not UTF-8: a replacement character
def test_webdataset_cls_label_must_be_a_non_negative_integer(tmp_path, synth_root, data, shown):
    ref = list_samples(synth_root, "train")
    (tmp_path / "train").mkdir()
    _wds_shard(tmp_path / "train" / "0000.tar", ref, [b"0", data, b"2"])
    with pytest.raises(DataError) as e:
        list_samples(tmp_path, "train", "webdataset")
    assert str(e.value) == f"{tmp_path / 'train' / '0000.tar'}:000001.cls: label {shown} must be a non-negative integer"
    _wds_shard(tmp_path / "train" / "0000.tar", ref, [b"0", b" 3\n", b"2"])  # whitespace around it is fine
    assert list_samples(tmp_path, "train", "webdataset").labels == [0, 3, 2]


def test_webdataset_format(tmp_path, synth_root, make_cfg):
    ref = list_samples(synth_root, "train")
    (tmp_path / "train").mkdir()
    for shard in range(2):
        with tarfile.open(tmp_path / "train" / f"{shard:04d}.tar", "w") as tar:
            for i in range(shard, len(ref), 2):
                for name, data in ((f"{i:06d}.jpg", ref.read_bytes(i)), (f"{i:06d}.cls", str(ref.labels[i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    s = list_samples(tmp_path, "train", "webdataset")
    assert len(s) == len(ref) and sorted(s.labels) == sorted(ref.labels)
    # Only where each image lies is kept; its bytes are read from the tar on demand.
    assert all(isinstance(m, tuple) and len(m) == 2 for m in s.members)
    for k in (0, 7, len(s) - 1):
        i = int(s.files[k].rpartition(":")[2].partition(".")[0])  # the sample key is the ref index
        assert s.read_bytes(k) == ref.read_bytes(i) and s.size(k) == len(ref.read_bytes(i))
    loader = build_train_loader(make_cfg("data.format=webdataset", "data.backend=torchvision", "data.num_threads=1",
                                         root=tmp_path))
    assert sum(len(b[2]) for b in loader.epoch(0)) == 32


def _verify_worker(rank, port, root, skip, out):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    from sslight_dali.run_config import load_config
    from sslight_dali.data.base import load_split
    cfg = load_config(None, [f"data.root={root}", f"data.skip_bad_files={skip}"])
    try:
        result = {"n": len(load_split(cfg, "train"))}
    except Exception as e:  # noqa: BLE001 - the test compares what each rank saw
        result = {"error": f"{type(e).__name__}: {e}"}
    torch.save(result, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("skip", [True, False])
def test_ranks_share_rank0_verdict_on_bad_files(tmp_path, skip):
    import socket

    import torch.multiprocessing as mp

    from sslight_dali.synth import synth_dataset
    synth_dataset(tmp_path / "d", classes=2, per_class=3, val_per_class=1, min_side=32, max_side=40)
    bad = next((tmp_path / "d" / "train").rglob("*.jpg"))
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_verify_worker, args=(port, str(tmp_path / "d"), skip, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0 == r1  # both ranks reach the same verdict; neither hangs
    if skip:
        assert r0 == {"n": 5}
    else:
        assert "DataError" in r0["error"] and bad.name in r0["error"]


def test_synth_clutter_scales_the_background_texture():
    from sslight_dali.synth import make_image, synth_dataset

    def corner_std(clutter):
        img = np.asarray(make_image("disc", np.random.default_rng(3), 128, 128, clutter), np.float32)
        return float(img[:12, :12].reshape(-1, 3).std(0).mean())  # the disc never reaches the corner (radius <= 0.42 side)
    flat, default = corner_std(0.0), corner_std(1.0)
    assert flat < 0.5 and default > 2.0
    with pytest.raises(ValueError, match="clutter"):
        synth_dataset("/nonexistent", clutter=-1)


def test_file_check_verdict_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    from sslight_dali.run_config import load_config
    from sslight_dali.data import sources
    from sslight_dali.data.base import load_split
    from sslight_dali.synth import synth_dataset

    synth_dataset(tmp_path / "d", classes=2, per_class=3, val_per_class=1, min_side=32, max_side=40)
    files = sorted((tmp_path / "d" / "train").rglob("*.jpg"))
    files[0].write_bytes(files[0].read_bytes()[:200])  # truncated
    cache = tmp_path / "cache"
    cfg = load_config(None, [f"data.root={tmp_path / 'd'}", "data.skip_bad_files=true", f"data.verify_cache={cache}"])
    reads = []
    check = sources.check_image
    monkeypatch.setattr(sources, "check_image", lambda data: reads.append(1) or check(data))

    assert len(load_split(cfg, "train")) == 5 and len(reads) == 6  # every file read once
    assert len(list(cache.glob("*.json"))) == 1
    assert len(load_split(cfg, "train")) == 5 and len(reads) == 6  # restart: verdict reused, nothing read

    files[1].write_bytes(b"")  # a file changes: the verdict is stale, every file is read again
    assert len(load_split(cfg, "train")) == 4 and len(reads) == 12
    assert len(list(cache.glob("*.json"))) == 2

    # Without skipping, a cached bad verdict still stops the run, naming the file.
    strict = load_config(None, [f"data.root={tmp_path / 'd'}", f"data.verify_cache={cache}"])
    with pytest.raises(DataError, match=files[0].name):
        load_split(strict, "train")
    assert len(reads) == 12

    off = load_config(None, [f"data.root={tmp_path / 'd'}", "data.skip_bad_files=true", "data.verify_cache="])
    assert len(load_split(off, "train")) == 4 and len(reads) == 18  # '' = no cache: read again


def test_verify_cache_auto_follows_xdg_cache_home(monkeypatch, tmp_path):
    from sslight_dali.run_config import load_config
    from sslight_dali.data.base import verify_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert verify_cache_dir(load_config(None, [])) == str(tmp_path / "sslight-dali" / "verified")
    assert verify_cache_dir(load_config(None, ["data.verify_cache=/x/y"])) == "/x/y"
