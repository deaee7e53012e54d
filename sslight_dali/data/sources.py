"""The samples of a split, listed by its data format (the table in sslight_dali/data_formats.py) and
checked.

Every backend reads the same `Samples` (encoded bytes come from files or tar members), so the
DALI and torchvision loaders see identical data in identical dataset order. Bad files are found
here, up front, with a cheap PIL check: DALI would otherwise fail mid-epoch with a message that
does not always name the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data_formats import FORMATS, IMG_EXTENSIONS, DataError, Samples, wds_name
from ..files import atomic_write

log = logging.getLogger(__name__)


class PipelinesDoNotFit(DataError):
    """data.pipelines does not fit the threads or the images (`sslight bench tune` records such a
    candidate as failed and goes on)."""


def list_samples(root: str | Path, split: str, fmt: str = "imagefolder", skip_bad_files: bool = False,
                 check: bool = True) -> Samples:
    """List (and by default verify) the samples of `split` under `root` in format `fmt`, through its
    entry of the format table (sslight_dali/data_formats.py)."""
    root = Path(root)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {list(FORMATS)}")
    entry = FORMATS[fmt]
    samples = entry.list_split(root, split)
    if samples.storage != entry.storage:  # the backends read the bytes by the storage the Samples have
        raise RuntimeError(f"data format {fmt!r} listed {samples.storage} samples; its table entry says "
                           f"{entry.storage}")
    if not len(samples):
        raise DataError(f"no images found for split '{split}' under {root} (format {fmt}; image files end in "
                        f"{', '.join(IMG_EXTENSIONS)})")
    return verify_samples(samples, skip_bad_files) if check else samples


# PIL modes of 32-bit integer and float samples: DALI's decoder cannot read them ("Invalid
# sample_type"), and there is no one right way to map them to 8 bits.
_UNSUPPORTED_MODES = {"I": "32-bit integer samples", "F": "32-bit float samples"}
# In JPEG entropy-coded data 0xFF is followed by 0x00 (stuffing), a restart marker, or 0xFF (fill);
# any other marker must be one that may follow a scan. Junk written over the middle of a file shows
# up as a marker that cannot be there. (Damage that keeps the byte structure, e.g. zeroed blocks, is
# only visible to a full Huffman decode: libjpeg then warns "Corrupt JPEG data" and fills grey.)
_JPEG_MARKER = re.compile(rb"\xff(?![\x00\xd0-\xd7\xff])(.)", re.S)
_AFTER_SCAN = set(b"\xc4\xcc\xda\xdb\xdd\xd9\xfe") | set(range(0xE0, 0xF0)) | {0xDC}


def _jpeg_scan_problem(data: bytes) -> str | None:
    sos = data.find(b"\xff\xda")
    if sos < 0:
        return "no image data (no start-of-scan marker)"
    for m in _JPEG_MARKER.finditer(data, sos + 2):
        code = m.group(1)[0]
        if code not in _AFTER_SCAN:
            return f"corrupt JPEG data (marker 0xFF{code:02X} inside the image data at byte {m.start()})"
        if code == 0xD9:
            return None
        if code == 0xDA:  # next scan (progressive): skip its header
            continue
    return None


def check_image(data: bytes) -> str | None:
    """Why these encoded bytes are not a usable image, or None if they are. Decodes the image (JPEGs
    at 1/8 scale, which still reads all of the compressed data), so what PIL cannot decode is caught
    here and not mid-epoch, plus what DALI cannot decode although PIL can."""
    if not data:
        return "empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and CRCs, no pixel decode
        if data[:2] == b"\xff\xd8":
            if b"\xff\xd9" not in data[-1024:]:
                # verify() accepts a JPEG cut short; DALI's decoder fails on it mid-epoch ("Premature end
                # of JPEG data") and the pipeline is then unusable. Trailing junk after EOI is tolerated.
                return "truncated JPEG (no end-of-image marker)"
            problem = _jpeg_scan_problem(data)
            if problem:
                return problem
        with Image.open(io.BytesIO(data)) as im:
            if im.width < 1 or im.height < 1:
                return "zero-sized image"
            if im.mode in _UNSUPPORTED_MODES:
                return (f"{_UNSUPPORTED_MODES[im.mode]} ({im.format}, PIL mode {im.mode}) are not supported; "
                        "convert the image to 8 or 16 bits per channel")
            if im.format == "TIFF" and im.mode == "1":
                return "1-bit TIFF is not supported by DALI's decoder; convert the image to 8 bits"
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Image.DecompressionBombError as e:
        return f"{e} (raise data.max_image_pixels to accept it)"
    except Exception as e:  # PIL raises many types for junk input
        return f"not a decodable image ({type(e).__name__}: {e})"
    return None


def set_pixel_limit(max_pixels: int) -> None:
    """data.max_image_pixels -> PIL's decompression-bomb limit (0 = none), for the file check and the
    torchvision loader's workers (forked after this is set)."""
    Image.MAX_IMAGE_PIXELS = max_pixels or None


def find_bad_samples(samples: Samples, workers: int = 8) -> list[tuple[int, str]]:
    """(index, reason) of every sample that is not a usable image. Threads overlap the file reads."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = pool.map(lambda i: check_image(samples.read_bytes(i)), range(len(samples)), chunksize=64)
        return [(i, why) for i, why in enumerate(reasons) if why is not None]


CHECK_VERSION = 2  # bump when check_image changes, so cached verdicts are not trusted


def _source_files(samples: Samples) -> list[str]:
    """The files the samples are read from: one per sample, or the WebDataset tar shards."""
    if samples.storage == "files":
        return samples.files
    return sorted({wds_name(f)[0] for f in samples.files})


def verdict_key(samples: Samples) -> str:
    """A digest of everything a verdict depends on: the sample names in order, the path, size and
    mtime of every source file, and the check's version. A replaced or rewritten file changes it."""
    h = hashlib.sha256(f"v{CHECK_VERSION}\n".encode())
    for name in samples.files:
        h.update(name.encode() + b"\n")
    for path in _source_files(samples):
        st = os.stat(path)
        h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def find_bad_samples_cached(samples: Samples, workers: int, cache_dir: str) -> list[tuple[int, str]]:
    """find_bad_samples, with the verdict kept in `cache_dir` (a file per dataset state): a restart
    stats every file instead of reading it all. `cache_dir` '' disables the cache."""
    if not cache_dir:
        return find_bad_samples(samples, workers)
    path = Path(cache_dir).expanduser() / f"{verdict_key(samples)}.json"
    if path.is_file():
        bad = [(int(i), str(why)) for i, why in json.loads(path.read_text())["bad"]]
        log.info("file check: verdict for %d files under %s reused from %s (%d bad)", len(samples), samples.root,
                 path, len(bad))
        return bad
    bad = find_bad_samples(samples, workers)
    try:
        # atomic: a reader never sees half a verdict
        atomic_write(path, json.dumps({"root": samples.root, "files": len(samples), "bad": bad}))
    except OSError as e:  # a read-only home must not stop training; the next start checks again
        log.warning("file check: could not cache the verdict in %s (%s)", path.parent, e)
    return bad


def drop_bad_samples(samples: Samples, bad: list[tuple[int, str]], skip_bad_files: bool) -> Samples:
    """Raise DataError naming the first bad file, or drop the bad ones (counted and logged)."""
    if samples.broken:
        shard, why = samples.broken[0]
        if not skip_bad_files:
            raise DataError(f"WebDataset shard {shard} is {why}; replace it, or set data.skip_bad_files=true to "
                            "train on the samples before the damage")
        log.warning("WebDataset: %d damaged shard(s), training on the samples before the damage:\n%s",
                    len(samples.broken), "\n".join(f"  {s}: {w}" for s, w in samples.broken))
    if not bad:
        return samples
    if not skip_bad_files:
        i, why = bad[0]
        raise DataError(f"bad image file {samples.files[i]}: {why} (set data.skip_bad_files=true to skip such files)")
    drop = {i for i, _ in bad}
    log.warning("skipping %d bad image file(s) under %s:\n%s", len(bad), samples.root,
                "\n".join(f"  {samples.files[i]}: {why}" for i, why in bad))
    keep = [i for i in range(len(samples)) if i not in drop]
    if not keep:
        raise DataError(f"every image under {samples.root} is unreadable")
    return Samples([samples.files[i] for i in keep], [samples.labels[i] for i in keep], samples.classes,
                   samples.root, [samples.members[i] for i in keep] if samples.members is not None else None,
                   samples.broken)


def verify_samples(samples: Samples, skip_bad_files: bool = False) -> Samples:
    """Raise DataError naming the first bad file, or drop bad files (counted and logged)."""
    return drop_bad_samples(samples, find_bad_samples(samples), skip_bad_files)


@dataclass
class WdsIndex:
    """DALI's view of a WebDataset split: tar shards, one DALI index file per shard, and the map from
    a sample's DALI `source_info` ("<tar>:<data offset>:<member>") to its index in `Samples`."""
    tars: list[str]
    index_files: list[str]
    sample_of: dict[str, int]

    @property
    def info_len(self) -> int:
        """Bytes of the longest source_info."""
        return max(len(k.encode()) for k in self.sample_of)


def write_wds_index(samples: Samples, out_dir: str | Path) -> WdsIndex:
    """Write DALI webdataset index files (format v1.2, as DALI's wds2idx) listing exactly `samples`.

    Our own index rather than DALI's inferred one, so DALI reads the verified sample set (bad files
    skipped, only the image member of each sample) and its epoch length equals len(samples).
    """
    out_dir = Path(out_dir)
    if samples.storage != "tar":
        raise DataError(f"not a WebDataset split: {samples.root}")
    by_tar: dict[str, list[tuple[int, str]]] = {}
    for i, f in enumerate(samples.files):
        tar, member = wds_name(f)
        by_tar.setdefault(tar, []).append((i, member))
    tars, index_files, sample_of = [], [], {}
    for n, (tar, members) in enumerate(by_tar.items()):
        lines = []
        for i, member in members:
            if any(c.isspace() for c in member):  # the index format is whitespace-separated
                raise DataError(f"{tar}: member name with whitespace is not supported by DALI: {member!r}")
            offset, size = samples.members[i]
            ext = member.rpartition("/")[2].partition(".")[2]  # DALI: after the first dot of the basename
            lines.append((offset, f"{ext} {offset} {size} {member}"))
            sample_of[f"{tar}:{offset}:{member}"] = i
        lines.sort()  # tar order: sequential reads
        path = out_dir / f"{n:06d}.idx"
        path.write_text(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for _, line in lines))
        tars.append(tar)
        index_files.append(str(path))
    return WdsIndex(tars, index_files, sample_of)
