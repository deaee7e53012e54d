"""The data-format table: every `data.format`, one entry each.

An entry says
  list_split  how a split is listed: (root, split) -> `Samples` (the files and labels in dataset order, the
              class names); it raises DataError naming what is missing or malformed
  storage     where each sample's encoded bytes are, which says how both backends read them:
                "files"  one file per sample, `files[i]` its path: DALI's file reader; PIL on the path
                "tar"    members of WebDataset tar shards, `files[i]` = "<shard>.tar:<member>" and
                         `members[i]` = (offset, size) of its bytes: DALI's webdataset reader over our own
                         index files (data/loader.py); a seek into the tar for PIL

The keys are `data.format`'s choices (config.py reads them, in this order), and `data.sources.list_samples`
lists every split through the entry. A format whose samples are files needs nothing else; a new storage
also needs its reader in `data/dali_views.READERS`, its `ReaderSpec` in `data/loader._DaliLoader._reader`
and its branch of `Samples.read_bytes`. This module imports only the standard library, so config.py
(and `sslight --help`) can read it.
"""
from __future__ import annotations

import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

log = logging.getLogger(__name__)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """A split, a file or a sample is missing or unreadable; the message names it."""


@dataclass
class Samples:
    """One split: `files[i]` (a path, or `shard.tar:key.jpg` for WebDataset) has label `labels[i]`."""
    files: list[str]
    labels: list[int]
    classes: list[str]
    root: str = ""
    # WebDataset only: (offset, size) of each sample's image bytes inside its tar. Only where the
    # bytes are is kept, so a split of any size costs a few numbers per sample in memory.
    members: list[tuple[int, int]] | None = field(default=None, repr=False)
    # WebDataset shards that are cut short or unreadable past some point: (shard, why). Their intact
    # samples are listed; data.skip_bad_files decides whether training may go on without the rest.
    broken: list[tuple[str, str]] = field(default_factory=list, repr=False)

    @property
    def storage(self) -> str:
        """Where the bytes are (see the module docstring): "tar" with members, else "files"."""
        return "files" if self.members is None else "tar"

    def __len__(self) -> int:
        return len(self.files)

    def size(self, i: int) -> int:
        return self.members[i][1] if self.storage == "tar" else os.path.getsize(self.files[i])

    def read_bytes(self, i: int) -> bytes:
        if self.storage == "files":
            return Path(self.files[i]).read_bytes()
        offset, size = self.members[i]
        with open(wds_name(self.files[i])[0], "rb") as f:
            f.seek(offset)
            return f.read(size)


def wds_name(name: str) -> tuple[str, str]:
    """'<shard>.tar:<member>' -> (shard path, member name)."""
    head, sep, member = name.partition(".tar:")
    if not sep:
        raise DataError(f"not a WebDataset sample name (expected '<shard>.tar:<member>'): {name}")
    return head + ".tar", member


@dataclass(frozen=True)
class DataFormat:
    list_split: Callable[[Path, str], Samples]
    storage: Literal["files", "tar"]


def _images_under(d: Path) -> list[str]:
    """Image files under d, sorted by path. Dangling symlinks are counted and logged, not silently lost."""
    files, dangling = [], []
    for p in sorted(d.rglob("*")):
        if p.suffix.lower() in IMG_EXTENSIONS:
            if p.is_file():
                files.append(str(p))
            elif p.is_symlink() and not p.exists():
                dangling.append(str(p))
    if dangling:
        log.warning("%d dangling symlink(s) under %s skipped (their targets do not exist):\n%s", len(dangling), d,
                    "\n".join(f"  {p}" for p in dangling))
    return files


def _imagefolder(root: Path, split: str) -> Samples:
    d = root / split
    if not d.is_dir():
        hint = ""
        if root.is_dir() and any(p.suffix.lower() in IMG_EXTENSIONS for p in root.iterdir()):
            hint = f"; {root} itself holds images: set data.format=folder to train on them without labels"
        raise DataError(f"split directory not found: {d}{hint}")
    # Same order as torchvision ImageFolder: classes sorted by name, files sorted by path.
    classes = sorted(e.name for e in d.iterdir() if e.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        found = _images_under(d / name)
        files += found
        labels += [c] * len(found)
    if not files and any(p.suffix.lower() in IMG_EXTENSIONS for p in d.iterdir()):
        log.info("%s has images but no class folders: using them without labels (data.format=folder)", d)
        return _folder(root, split)
    return Samples(files, labels, classes, str(d))


def _folder(root: Path, split: str) -> Samples:
    """Unlabeled images anywhere under root/<split> (or under root, if it has no such folder): what
    self-supervised pre-training needs. No classes, so the joint probe and kNN need a labelled val split."""
    d = root / split if (root / split).is_dir() else root
    if not d.is_dir():
        raise DataError(f"data folder not found: {d}")
    files = _images_under(d)
    return Samples(files, [0] * len(files), [], str(d))


def parse_label(text: str, where: str) -> int:
    """A class index as written in a file list or a .cls member. A negative one (often -1 for
    "unlabelled") or a non-integer would fail much later, inside the loss or the kNN vote."""
    if re.fullmatch(r"[0-9]+", text) is None:
        raise DataError(f"{where}: label {text!r} must be a non-negative integer")
    return int(text)


def _filelist(root: Path, split: str) -> Samples:
    path = root / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"file list not found: {path}")
    files, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'path label', got {line!r}")
        labels.append(parse_label(parts[1], f"{path}:{n}"))
        p = Path(parts[0])
        files.append(str(p if p.is_absolute() else root / p))
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed files do not exist, e.g. {missing[:3]}")
    n_cls = max(labels) + 1 if labels else 0
    return Samples(files, labels, [str(i) for i in range(n_cls)], str(root))


def _webdataset(root: Path, split: str) -> Samples:
    shards = sorted((root / split).glob("*.tar")) if (root / split).is_dir() else []
    shards = shards or sorted(root.glob(f"{split}-*.tar"))
    if not shards:
        raise DataError(f"no WebDataset shards found: {root / split}/*.tar or {root}/{split}-*.tar")
    files, labels, members, broken = [], [], [], []
    for shard in shards:
        images, cls, size = {}, {}, os.path.getsize(shard)
        why = None
        try:
            with tarfile.open(shard) as tar:
                for m in tar:  # headers only; just the tiny .cls members are read
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:
                        why = f"cut short inside member {m.name}"
                        break
                    key, _, ext = m.name.partition(".")
                    if "." + ext.lower() in IMG_EXTENSIONS:
                        images[key] = (m.name, m.offset_data, m.size)
                    elif ext.lower() == "cls":
                        text = tar.extractfile(m).read().decode(errors="replace").strip()
                        cls[key] = parse_label(text, f"{shard}:{m.name}")
                end = tar.offset
            if why is None and not _has_end_marker(shard, end):
                # tarfile stops quietly at a header that is not there: a tar cut between members
                why = "cut short (no end-of-archive marker after its last member)"
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            why = f"unreadable past byte {max((v[1] + v[2] for v in images.values()), default=0)} ({e})"
        if why is not None:
            broken.append((str(shard), why))
            images = {k: v for k, v in images.items() if k in cls}  # the intact samples
        for key in sorted(images):
            if key not in cls:
                raise DataError(f"{shard}: sample '{key}' has an image but no .cls label")
            name, offset, size = images[key]
            files.append(f"{shard}:{name}")
            labels.append(cls[key])
            members.append((offset, size))
    n_cls = max(labels) + 1 if labels else 0
    return Samples(files, labels, [str(i) for i in range(n_cls)], str(root), members, broken)


def _has_end_marker(shard: Path, offset: int) -> bool:
    """A complete tar ends with two zero blocks where the next header would be."""
    with open(shard, "rb") as f:
        f.seek(offset)
        tail = f.read(1024)
    return len(tail) == 1024 and not any(tail)


# the table (its order is the order `data.format`'s error message lists the choices in)
FORMATS: dict[str, DataFormat] = {
    # <root>/<split>/<class>/*.jpg, labels from the sorted class folders (torchvision's ImageFolder); a
    # split of images without class folders is read as folder
    "imagefolder": DataFormat(_imagefolder, "files"),
    # unlabelled images anywhere under <root>/<split>/, or under <root>
    "folder": DataFormat(_folder, "files"),
    # <root>/<split>.txt of "path label" lines, paths relative to <root>
    "filelist": DataFormat(_filelist, "files"),
    # tar shards <root>/<split>/*.tar (or <root>/<split>-*.tar) holding key.jpg + key.cls
    "webdataset": DataFormat(_webdataset, "tar"),
}
