"""Bad files at run time (after the up-front check) on both backends, what the up-front check catches,
and one pixel truth for EXIF orientation and 16-bit images."""
from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslight_dali.data import DataError, build_train_loader
from sslight_dali.data.sources import check_image
from sslight_dali.train import train

BACKENDS = ["dali", "torchvision"]


@pytest.fixture
def root(tmp_path, tiny_data):
    shutil.copytree(tiny_data, tmp_path / "ds")
    return tmp_path / "ds"


def _int32_tiff() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 1000).astype(np.int32), "I").save(buf, "TIFF")
    return buf.getvalue()


def _jpeg(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((48, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_up_front_check_catches_what_dali_cannot_decode():
    good = _jpeg()
    assert check_image(good) is None
    assert "32-bit integer" in check_image(_int32_tiff())
    one_bit = io.BytesIO()
    Image.new("1", (8, 8), 1).save(one_bit, "TIFF")
    assert "1-bit TIFF" in check_image(one_bit.getvalue())
    # Junk written over the middle of the compressed data: a marker where none can be.
    mid = len(good) // 2
    assert "corrupt JPEG data" in check_image(good[:mid] + b"\xff\x01" + good[mid + 2:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_broken_after_the_check_is_named_and_the_run_stops_after_a_checkpoint(backend, root, tmp_path,
                                                                                     make_cfg):
    cfg = make_cfg(f"data.backend={backend}", "train.knn_every=0", "train.tensorboard=false",
                   f"train.output_dir={tmp_path / 'out'}", "train.max_steps=8", "recipe.local.count=0",
                   "train.batch_size=4", "data.num_threads=1", "train.device=cpu", root=root)
    victim = sorted((root / "train").rglob("*.jpg"))[5]
    import sslight_dali.data.build as build
    real = build.load_split

    def check_then_break(cfg_, split):  # the file changes after the up-front check
        samples = real(cfg_, split)
        # DALI cannot decode a 32-bit integer TIFF (PIL can); PIL cannot decode junk.
        victim.write_bytes(_int32_tiff() if backend == "dali" else b"junk" * 100)
        return samples
    build.load_split = check_then_break
    try:
        with pytest.raises(DataError, match=victim.name) as e:
            train(cfg)
    finally:
        build.load_split = real
    assert "\n" not in str(e.value) and ("32-bit integer" in str(e.value) or "cannot decode" in str(e.value))
    if backend == "torchvision":
        assert "checkpoint written at step" in str(e.value)


def test_torchvision_replaces_a_file_broken_at_run_time_when_asked(root, make_cfg, caplog):
    cfg = make_cfg("data.backend=torchvision", "data.skip_bad_files=true", "data.num_threads=1",
                   "recipe.local.count=0", root=root)
    loader = build_train_loader(cfg, channels_last=False)
    files = loader.dataset.samples.files
    victim = sorted((root / "train").rglob("*.jpg"))[5]
    victim.write_bytes(b"not an image any more")
    i = files.index(str(victim))
    with caplog.at_level(logging.WARNING):
        views, label, j = loader.dataset[i]
    assert j == i + 1 and label == loader.dataset.samples.labels[j]
    assert f"{victim} does not decode; replaced by {files[j]} (1 file(s) replaced" in caplog.text
    seen = [k for _, _, idx in loader.epoch(0) for k in idx.tolist()]  # in a worker process
    assert len(seen) == loader.steps_per_epoch * 8 and i not in seen


# --- one pixel truth -----------------------------------------------------------------------------
def _dali_decode(path: Path) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def
    from sslight_dali.data.dali_views import _decode, _shape

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        data, _ = fn.readers.file(files=[str(path)], labels=[0])
        return _decode(data, "cpu", 0.0), _shape(data)
    p = pipe()
    p.build()
    img, shape = p.run()
    img = img.as_array()[0]
    assert list(shape.as_array()[0]) == list(img.shape)  # crop windows see the decoded orientation
    return img


def _torch_decode(path: Path) -> np.ndarray:
    from sslight_dali.data.torch_views import to_rgb
    with Image.open(path) as im:
        return np.asarray(to_rgb(im))


def test_backends_agree_on_exif_orientation_and_16_bit_pixels(tmp_path):
    # EXIF orientation 6 on a 20x10 image whose left half is white: both backends keep it as stored.
    exif = Image.Exif()
    exif[0x0112] = 6
    im = Image.new("RGB", (20, 10))
    im.paste((255, 255, 255), (0, 0, 10, 10))
    im.save(tmp_path / "exif6.jpg", exif=exif.tobytes(), quality=100)
    # Every 16-bit value once, grey PNG and TIFF: scaled to 8 bits by 255/65535, rounded.
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "g16.png")
    Image.fromarray(values).save(tmp_path / "g16.tif")
    for name in ("exif6.jpg", "g16.png", "g16.tif"):
        d, t = _dali_decode(tmp_path / name), _torch_decode(tmp_path / name)
        assert d.shape == t.shape, name
        assert np.array_equal(d, t), f"{name}: {np.abs(d.astype(int) - t).max()} grey levels apart"
    assert _torch_decode(tmp_path / "exif6.jpg").shape == (10, 20, 3)
    g = _torch_decode(tmp_path / "g16.png")[..., 0].reshape(-1)
    assert g[32768] == 128 and g[65535] == 255 and g[65280] == 254 and g[128] == 0


# --- WebDataset shards cut short ---------------------------------------------------------------
def _shard(path: Path, n: int) -> list[int]:
    """A tar of n samples (jpg + cls); returns each sample's header offset."""
    import tarfile
    starts = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for name, data in ((f"{i:04d}.jpg", _jpeg(i)), (f"{i:04d}.cls", str(i % 3).encode())):
                if name.endswith(".jpg"):
                    starts.append(tar.offset)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return starts


@pytest.mark.parametrize("cut", ["between_members", "inside_a_member"])
def test_a_truncated_webdataset_shard_is_named_or_its_intact_samples_used(tmp_path, cut, caplog):
    from sslight_dali.data import list_samples
    from sslight_dali.data.sources import drop_bad_samples
    (tmp_path / "train").mkdir()
    shard = tmp_path / "train" / "0000.tar"
    starts = _shard(shard, 24)
    data = shard.read_bytes()
    end = starts[15] if cut == "between_members" else starts[15] + 700  # in sample 15's image data
    shard.write_bytes(data[:end])
    samples = list_samples(tmp_path, "train", "webdataset", check=False)
    with pytest.raises(DataError, match=f"shard {shard} is cut short.*data.skip_bad_files=true"):
        drop_bad_samples(samples, [], skip_bad_files=False)
    with caplog.at_level(logging.WARNING):
        kept = drop_bad_samples(samples, [], skip_bad_files=True)
    assert len(kept) == 15 and "1 damaged shard(s)" in caplog.text and str(shard) in caplog.text
    assert all(check_image(kept.read_bytes(i)) is None for i in range(len(kept)))
