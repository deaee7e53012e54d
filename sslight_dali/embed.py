"""`sslight embed CHECKPOINT data.root=DIR --out FILE`: the eval-view features of every image of a split.

The features are those `sslight eval knn` classifies: the backbone's pooled features (not normalised) of
the eval view (shorter side resized to eval.resize, bicubic, centre crop eval.crop, normalised), extracted
with the same loader, precision and memory format (knn.extract_features). Under torchrun every process
embeds its own shard; the rows are gathered and put in dataset order (the order `data.format` lists the
split in), so row i is the image at paths[i]. Rank 0 writes the file, atomically (a temp file beside it,
renamed once complete).

Output, by the name of --out:
  .npz      features [N, D] float32, paths [N] str, and for a labelled split labels [N] int64 and
            classes [C] str; meta: a JSON string (checkpoint, backbone, split, crop, ...). Read it with
            `np.load(FILE)` (no pickle).
  .parquet  one row per image: path, label and class (labelled splits), embedding (list<float32>[D]);
            the same meta as JSON under the schema metadata key b"sslight". Needs pyarrow (optional).
A split is labelled when its format gives class names: imagefolder's class folders, filelist and
webdataset labels. data.format=folder (images anywhere under the split folder) has none.
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .data import build_eval_loader
from .data.base import load_split
from .evaluate.common import check_splits, eval_config
from .export import ExportError, _check_out, load_backbone, write_files
from .knn import extract_features
from .logger import setup_logging
from .runtime import (autocast_dtype, init_distributed, prepare_process, resolve_precision, shutdown_distributed,
                      uses_channels_last)

log = logging.getLogger("sslight")
SUFFIXES = (".npz", ".parquet")
PROGRESS_EVERY_S = 10.0  # seconds between progress lines (and one at the end)


def require_parquet():
    try:
        return importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ExportError("--out *.parquet needs the Python package 'pyarrow': pip install pyarrow "
                          "(or write .npz)") from None


def check_out(out: Path, checkpoint: Path) -> None:
    if out.suffix not in SUFFIXES:
        raise ExportError(f"--out {out}: the name must end in {' or '.join(SUFFIXES)} (the format written)")
    if out.suffix == ".parquet":
        require_parquet()
    _check_out(out, checkpoint, with_sidecar=False)


def with_progress(loader, n_images: int, world: int):
    """The loader's batches, with a progress line every PROGRESS_EVERY_S seconds (this rank's count x world)."""
    t0 = last = time.perf_counter()
    done = 0
    for batch in loader:
        yield batch
        done += batch[0].shape[0]
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            log.info(f"embed: ~{min(done * world, n_images)}/{n_images} images ({done / (now - t0):.1f} img/s "
                     "per process)")


def npz_bytes(features: np.ndarray, paths: list[str], labels, classes, meta: dict) -> bytes:
    arrays = {"features": features, "paths": np.array(paths, dtype=str), "meta": np.array(json.dumps(meta))}
    if labels is not None:
        arrays.update(labels=labels, classes=np.array(classes, dtype=str))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def parquet_bytes(features: np.ndarray, paths: list[str], labels, classes, meta: dict) -> bytes:
    pa, pq = require_parquet()
    dim = features.shape[1]
    columns = {"path": pa.array(paths, pa.string())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
        columns["class"] = pa.array([classes[i] for i in labels], pa.string())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), dim)
    table = pa.table(columns).replace_schema_metadata({"sslight": json.dumps(meta)})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def embed(checkpoint, out, overrides=(), split: str = "val", weights: str = "student") -> dict:
    """Embed every image of `split` ('val', 'train' or a split name) with the checkpoint's backbone and write
    them to `out` (.npz or .parquet); returns the summary the CLI prints (on every rank; rank 0 writes)."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_out(out, checkpoint)
    pre = load_backbone(checkpoint, weights)
    cfg = eval_config(pre, list(overrides), None)
    split_name = {"val": cfg.data.val_split, "train": cfg.data.train_split}.get(split, split)
    check_splits(cfg, split_name)
    rank, world, device = init_distributed(cfg)
    try:
        setup_logging(None, rank)
        prepare_process(cfg.train.seed + rank, device)
        amp, channels_last = autocast_dtype(resolve_precision(cfg, device)), uses_channels_last(cfg)
        samples = load_split(cfg, split_name)
        loader = build_eval_loader(cfg, split_name, rank, world, channels_last, samples=samples)
        backbone = pre.backbone.to(device)
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        log.info(f"embed: {len(samples)} images of {samples.root} ({cfg.data.format}) with {checkpoint} "
                 f"({pre.cfg.model.backbone}, {weights}) on {world} x {device}")
        feats, labels = extract_features(backbone, with_progress(loader, len(samples), world), device, amp)
    finally:
        shutdown_distributed()
    if feats.shape[0] != len(samples):  # every sample index exactly once, so row i is samples.files[i]
        raise RuntimeError(f"embed: {feats.shape[0]} feature rows for {len(samples)} images")
    labelled = bool(samples.classes)
    meta = {"checkpoint": str(checkpoint.resolve()), "backbone": pre.cfg.model.backbone, "method": pre.cfg.method,
            "weights": weights, "epoch": pre.epoch, "split": split_name, "data_root": str(cfg.data.root),
            "data_format": cfg.data.format, "images": len(samples), "feature_dim": int(feats.shape[1]),
            "feature": "pooled backbone features of the eval view (as `sslight eval knn`), not normalised",
            "resize": cfg.eval.resize, "crop": cfg.eval.crop, "mean": list(cfg.recipe.augment.mean),
            "std": list(cfg.recipe.augment.std), "labelled": labelled}
    if rank == 0:
        to_bytes = parquet_bytes if out.suffix == ".parquet" else npz_bytes
        data = to_bytes(feats.cpu().numpy().astype(np.float32), list(samples.files),
                        labels.cpu().numpy().astype(np.int64) if labelled else None, list(samples.classes), meta)
        write_files({out: lambda f: f.write(data)})
        log.info(f"embed: wrote {len(samples)} x {feats.shape[1]} features to {out}")
    return {**meta, "out": str(out)}

