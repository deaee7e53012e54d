"""The data-format table (sslight_dali/data_formats.py) is the one place that says which data formats there
are: `data.format`'s choices, how a split is listed, where its bytes are and so how both backends read
them. The last test adds one (a CSV list of "path,label" rows) from this file alone, and trains and
evaluates on it with both backends."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslight_dali import checkpoint as ckpt
from sslight_dali.cli import main
from sslight_dali.config import ConfigError
from sslight_dali.run_config import load_config
from sslight_dali.data import DataError, build_eval_loader, list_samples
from sslight_dali.data_formats import FORMATS, DataFormat, Samples
from sslight_dali.pretrained import load_pretrained

CONFIG = "configs/dino/resnet18_sslight.yaml"
SHIPPED = ["imagefolder", "folder", "filelist", "webdataset"]
TINY = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=4",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.num_threads=1",
        "train.knn_every=0", "train.log_every=1", "eval.resize=36", "eval.crop=32", "eval.batch_size=4",
        "train.device=cpu", "data.device=cpu", "train.tensorboard=false", "train.max_steps=2", "eval.knn_k=3"]


def test_shipped_table_and_config_choices():
    assert list(FORMATS) == SHIPPED
    assert {n: f.storage for n, f in FORMATS.items()} == {"imagefolder": "files", "folder": "files",
                                                          "filelist": "files", "webdataset": "tar"}
    assert load_config(CONFIG, ["data.format=webdataset"]).data.format == "webdataset"
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, ["data.format=csv"])
    assert str(e.value) == f"override data.format='csv': data.format: 'csv' is not allowed; choose one of {SHIPPED}"


def test_imagefolder_without_class_folders_reads_as_folder_or_hints_at_it(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=re.escape(f"split directory not found: {tmp_path / 'train'}; {tmp_path} "
                                                  "itself holds images: set data.format=folder")):
        list_samples(tmp_path, "train", "imagefolder", check=False)
    (tmp_path / "train").mkdir()
    shutil.move(tmp_path / "a.png", tmp_path / "train" / "a.png")
    s = list_samples(tmp_path, "train", "imagefolder", check=False)
    assert (s.files, s.classes) == ([str(tmp_path / "train" / "a.png")], [])


# --- a format added from this file ------------------------------------------------------------------
def list_csv(root: Path, split: str) -> Samples:
    """<root>/<split>.csv: a header, then "path,label" rows (paths relative to <root>)."""
    path = root / f"{split}.csv"
    if not path.is_file():
        raise DataError(f"CSV list not found: {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [int(r["label"]) for r in rows]
    return Samples([str(root / r["path"]) for r in rows], labels, [str(c) for c in range(max(labels) + 1)],
                   str(root))


CSV = DataFormat(list_csv, "files")


def colour(i: int) -> tuple[int, int, int]:
    """A colour of its own for image i, so an image tells which file it was read from: a shade of red,
    green or blue by its label i % 3, so that kNN has something to find."""
    return tuple(200 if c == i % 3 else 40 + 4 * (i // 3) for c in range(3))


@pytest.fixture
def csv_root(tmp_path):
    """Flat PNGs of one colour each, of varied size, listed in train.csv (12) and val.csv (8) in an order that
    is not the file names' and with labels no folder gives (3 classes)."""
    root = tmp_path / "csvdata"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, ids in (("train", range(12)), ("val", range(12, 20))):
        rows = []
        for i in rng.permutation(list(ids)):
            name = f"img/{i:03d}.png"
            Image.new("RGB", (int(rng.integers(36, 60)), int(rng.integers(36, 60))), colour(int(i))).save(root / name)
            rows.append((name, int(i) % 3))
        with (root / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows])
    return root


def test_an_entry_whose_lister_breaks_its_storage_is_refused(csv_root, monkeypatch):
    monkeypatch.setitem(FORMATS, "csv", DataFormat(list_csv, "tar"))
    with pytest.raises(RuntimeError, match="data format 'csv' listed files samples; its table entry says tar"):
        list_samples(csv_root, "train", "csv", check=False)


def listed(root: Path, split: str) -> tuple[list[int], list[int]]:
    """(image number, label) of each row of the CSV, read here without the format's code."""
    rows = list(csv.reader((root / f"{split}.csv").read_text().splitlines()))[1:]
    return [int(Path(p).stem) for p, _ in rows], [int(label) for _, label in rows]


def knn_top1_loo(feats: torch.Tensor, labels: torch.Tensor, k: int, t: float) -> float:
    """Leave-one-out weighted kNN top-1 (%), written out here."""
    f = F.normalize(feats.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))
    w, nn_idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(f), int(labels.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, labels[nn_idx], (w / t).exp())
    return 100.0 * (votes.argmax(1) == labels).double().mean().item()


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_format_added_from_this_file_trains_and_evaluates(backend, csv_root, tmp_path, monkeypatch):
    monkeypatch.setitem(FORMATS, "csv", CSV)  # removed again after the test
    cfg = load_config(CONFIG, TINY + ["data.format=csv", f"data.root={csv_root}", f"data.backend={backend}",
                                      f"train.output_dir={tmp_path / 'run'}"])
    numbers, labels = listed(csv_root, "train")
    mean, std = torch.tensor(cfg.recipe.augment.mean), torch.tensor(cfg.recipe.augment.std)

    # every listed image once per epoch, at its row's index, with its row's label: in order (eval), and
    # reshuffled (training's reader; crop + flip only, which keep a flat colour)
    for loader in (build_eval_loader(cfg, "train", channels_last=False),
                   build_eval_loader(cfg, "train", channels_last=False, train_augment=True, drop_last=True)):
        drawn = []
        for images, y, idx in loader.epoch(0):
            rgb = (images.float() * std[:, None, None] + mean[:, None, None]).mean((2, 3)) * 255
            want = torch.tensor([colour(numbers[i]) for i in idx.tolist()], dtype=torch.float32)
            torch.testing.assert_close(rgb, want, atol=1.0, rtol=0)
            assert y.tolist() == [labels[i] for i in idx.tolist()]
            drawn += idx.tolist()
        assert sorted(drawn) == list(range(12)) and len(loader) == 3
    assert drawn != sorted(drawn)

    from sslight_dali.train import train
    assert train(cfg)["steps"] == 2
    path = tmp_path / "run" / ckpt.LATEST
    assert ckpt.load(path)["config"]["data"]["format"] == "csv"

    # `sslight eval knn` on the val list: its top-1 is the leave-one-out kNN of the backbone's features of
    # the listed images (flat colours: any resize and centre crop of one is the colour itself)
    assert main(["eval", "knn", str(path), "--out", str(tmp_path / "knn")]) == 0
    res = json.loads((tmp_path / "knn" / "eval_knn.json").read_text())
    numbers, labels = listed(csv_root, "val")
    x = torch.stack([(torch.tensor(colour(n)) / 255.0 - mean) / std for n in numbers])[:, :, None, None]
    with torch.no_grad():
        feats = load_pretrained(path).backbone.eval()(x.expand(-1, -1, 32, 32).float())
    assert res["val_images"] == 8
    assert res["top1"] == pytest.approx(knn_top1_loo(feats, torch.tensor(labels), 3, cfg.eval.knn_t))
    assert res["top1"] > 50  # the listed labels arrived: colour shades by label are easy neighbours (chance: 33%)
