"""The DALI graph of a view-sampling recipe: read -> decode once -> per view: crop, flip, jitter, gray,
blur, solarize, normalize. The same code builds the CPU and the GPU graph; `device` only switches the
decoder and where the image operators run. Random parameters (coin flips, factors, crop windows) are
always drawn on the CPU, where DALI's conditionals and argument inputs need them.

Semantics follow the torchvision/PIL reference (sslight-reference.md §1.3, §7.3):
- crop: torchvision RandomResizedCrop window (area ~ U(scale), log-aspect ~ U(log ratio)), then a
  bicubic antialiased resize (PIL bicubic is antialiased when downscaling).
- flip: folded into crop_mirror_normalize. Every later op is pointwise or a symmetric blur, so
  flipping last equals flipping right after the crop.
- colour jitter, applied with p: brightness multiplies, contrast blends with the image's mean luma,
  saturation blends with luma, hue rotates by U(-360h, 360h) degrees. Like torchvision, the enabled
  ops run in a random order per sample (uniform over the n! orders of `jitter_orders`), each one
  rounding and clipping to uint8 as PIL does. The order is built from n slots; a slot runs the op the
  sample's order puts there, chosen with conditionals, so every sample still runs each op once. The
  ops commute in exact arithmetic (contrast/saturation keep luma, hue rotates the chroma plane); the
  order matters where a channel clips, ~12 grey levels MAE between two orders with strong factors
  (tests/test_data_parity.py). Measured cost against the old fixed order (DINO-SSLight, 8 views at
  full size, 350-500 px JPEGs, batch 32, 2 DALI threads, epochs interleaved in one process): CPU time
  per image +2 to +5% on the 2-core dev machine (29.8 vs 29.2 ms, wall time within noise); on the
  16-core host of the H100 machine +8% CPU time (60.9 vs 56.5 ms) and -15% images/s (40 vs 48).
  Selecting per-sample colour matrices (fn.coord_transform, or fn.hsv) instead of branching cost more
  (+14%, +11% CPU), so the slots branch.
- grayscale: ITU-R 601 luma in 3 channels. Blur: sigma ~ U(blur_sigma), a window of
  2*ceil(3*sigma_max)+1 taps (13 for sigma 2; wider windows cost CPU time and change nothing).
  Solarize: v >= threshold -> 255 - v.
Per-sample probabilities use DALI conditionals, so unselected samples skip the op entirely; an op
with p == 0 is not in the graph and one with p == 1 has no conditional.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from ..config import Augment, Recipe, ViewSpec
from .sources import IMG_EXTENSIONS

READER = "Reader"
IMAGE_EXTS = ";".join(e.lstrip(".") for e in IMG_EXTENSIONS)  # WebDataset image members (any case)
# Per-view debug record (float32): what the viewer and the parity tests need to know.
# jitter_order indexes jitter_orders(recipe.augment).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
FLAG_FIELDS = ("flip", "jitter", "brightness", "contrast", "saturation", "hue_deg", "gray", "blur_sigma",
               "solarize", "crop_y", "crop_x", "crop_h", "crop_w", "image_h", "image_w", "jitter_order")


@dataclass
class ReaderSpec:
    """What to read and how this process's shard is ordered.

    Files: the file reader, whose "label" output carries the dataset index. WebDataset (`index_files`
    set): `files` are the tar shards and the index output is the sample's padded `source_info` bytes,
    which the loader maps back to the dataset index (see loader.py).
    """
    files: list[str]
    indices: list[int]          # dataset index of each file (file reader only)
    shard_id: int = 0
    num_shards: int = 1
    shuffle: bool = True        # reshuffle after every epoch (shards stay disjoint)
    seed: int = 0               # the same on every rank, so all ranks agree on the permutation
    index_files: list[str] | None = None  # WebDataset: one DALI index file per tar
    source_info_len: int = 0    # WebDataset: bytes of the longest source_info
    initial_fill: int = 1024    # WebDataset: shuffle buffer (encoded samples) per rank


def blur_window(sigma_max: float) -> int:
    return 2 * math.ceil(3 * sigma_max) + 1


def _read(spec: ReaderSpec):
    if spec.index_files is not None:
        return _read_webdataset(spec)
    jpegs, index = fn.readers.file(
        files=spec.files, labels=spec.indices, name=READER, shard_id=spec.shard_id,
        num_shards=spec.num_shards, shuffle_after_epoch=spec.shuffle, seed=spec.seed,
        pad_last_batch=True)  # shards of equal length: every rank runs the same number of steps
    return jpegs, index


def _read_webdataset(spec: ReaderSpec):
    """Tars read sequentially. Shuffling is what DALI offers for containers: the tar order is
    reshuffled every epoch (same seed on every rank, so shards stay disjoint) and each rank draws its
    batches from a buffer of `initial_fill` samples. Shards are contiguous sample ranges, as in the
    file reader, so epoch length, padding and sharding behave the same."""
    jpegs = fn.readers.webdataset(
        paths=spec.files, index_paths=spec.index_files, ext=[IMAGE_EXTS], case_sensitive_extensions=False,
        missing_component_behavior="error", name=READER, shard_id=spec.shard_id, num_shards=spec.num_shards,
        random_shuffle=spec.shuffle, initial_fill=spec.initial_fill, shuffle_after_epoch=spec.shuffle,
        shuffle_after_epoch_seed=spec.seed, seed=spec.seed, pad_last_batch=True)
    # The reader has no sample index; "<tar>:<offset>:<member>" identifies the sample. Fixed length,
    # so the iterator gets a dense [B, L] uint8 tensor.
    info = fn.get_property(jpegs, key="source_info")
    return jpegs, fn.pad(info, fill_value=0, axes=[0], shape=[spec.source_info_len])


def _decode(jpegs, device: str, hw_decoder_load: float):
    if device == "gpu":
        # Padding hints avoid reallocations while nvJPEG's buffers grow to the largest image.
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 device_memory_padding=211025920, host_memory_padding=140544512)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi], dtype=types.FLOAT)


def _contrast(img, factor):
    # torchvision/PIL: blend with a constant image of the mean luma. DALI's contrast op pivots on a
    # fixed centre, so blend explicitly (works on CPU and GPU; the mean stays on the image's device).
    luma = fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
    mean = fn.reductions.mean(luma)
    if img.device == "gpu":
        factor = factor.gpu()
    return fn.cast(img * factor + mean * (1.0 - factor), dtype=types.UINT8)


def jitter_ops(aug: Augment) -> list[int]:
    """The enabled jitter ops, as indices into JITTER_OPS."""
    return [k for k, amount in enumerate((aug.brightness, aug.contrast, aug.saturation, aug.hue)) if amount > 0]


def jitter_orders(aug: Augment) -> list[tuple[int, ...]]:
    """Every order of the enabled ops; a sample's `jitter_order` indexes this list. With all four
    enabled this is torchvision's randperm(4) space, in lexicographic order. `jitter_order: fixed`
    keeps only the identity order."""
    if aug.jitter_order == "fixed":
        return [tuple(jitter_ops(aug))]
    return list(itertools.permutations(jitter_ops(aug)))


def _jitter_op(img, k: int, factors):
    if k == 0:
        return fn.brightness(img, brightness=factors[0])
    if k == 1:
        return _contrast(img, factors[1])
    if k == 2:
        return fn.saturation(img, saturation=factors[2])
    return fn.hue(img, hue=factors[3])


def _jitter_slot(img, slot_op, ops: list[int], factors):
    # One op per sample: the one its order puts in this slot. if/else splits the batch, so each
    # sample runs only its own op; the last candidate needs no test.
    if len(ops) == 1:
        return _jitter_op(img, ops[0], factors)
    if slot_op == ops[0]:
        img = _jitter_op(img, ops[0], factors)
    else:
        img = _jitter_slot(img, slot_op, ops[1:], factors)
    return img


def _jitter(img, aug: Augment, order, *factors):
    """Colour jitter on uint8 (each op saturates and rounds like PIL's), in the per-sample `order`
    (an index into jitter_orders(aug))."""
    orders = jitter_orders(aug)
    if len(orders) == 1:  # zero or one op: nothing to permute
        for k in orders[0]:
            img = _jitter_op(img, k, factors)
        return img
    for slot in range(len(orders[0])):
        slot_op = fn.lookup_table(order, keys=list(range(len(orders))), values=[o[slot] for o in orders],
                                  dtype=types.INT32)
        img = _jitter_slot(img, slot_op, jitter_ops(aug), factors)
    return img


def _solarize(img, threshold: int):
    return fn.cast(img + (img >= threshold) * (255 - 2 * img), dtype=types.UINT8)


def _const(v: float):
    return types.Constant(v, dtype=types.FLOAT, device="cpu")  # a DataNode, so it can be stacked


def _float(x):
    return fn.cast(x, dtype=types.FLOAT)


def _apply(p: float, op, img, *extra):
    """Run `op(img, *extra)` on a per-sample coin with probability p. Returns (img, applied flag)."""
    if p <= 0:
        return img, _const(0.0)
    if p >= 1:
        return op(img, *extra), _const(1.0)
    coin = _coin(p)
    if coin:
        img = op(img, *extra)
    return img, _float(coin)


def view_chain(images, shape, view: ViewSpec, aug: Augment, *, channels_last: bool, dtype=types.FLOAT):
    """One view of every image in the batch; returns (view, debug record)."""
    anchor, size = fn.random_crop_generator(shape, random_area=list(view.scale), random_aspect_ratio=list(aug.ratio))
    interp = types.INTERP_CUBIC if aug.interpolation == "bicubic" else types.INTERP_LINEAR
    start = _float(anchor)
    img = fn.resize(images, roi_start=start, roi_end=start + _float(size), size=[view.size, view.size],
                    interp_type=interp, antialias=True, dtype=types.UINT8)

    # Factors are drawn for every sample (cheap) so the debug record can report them.
    factors = (_uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness),
               _uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast),
               _uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation),
               _uniform(-360.0 * aug.hue, 360.0 * aug.hue))
    order = fn.random.uniform(values=list(range(len(jitter_orders(aug)))), dtype=types.INT32)
    img, jittered = _apply(aug.jitter_p, _jitter, img, aug, order, *factors)
    img, gray = _apply(aug.grayscale_p, lambda x: fn.saturation(x, saturation=0.0), img)
    lo, hi = aug.blur_sigma
    sigma = _uniform(lo, hi)
    img, blurred = _apply(view.blur_p, lambda x: fn.gaussian_blur(x, sigma=sigma, window_size=blur_window(hi)), img)
    img, solarized = _apply(view.solarize_p, _solarize, img, aug.solarize_threshold)

    flip = fn.random.coin_flip(probability=aug.flip_p, dtype=types.INT32) if aug.flip_p > 0 else 0
    out = fn.crop_mirror_normalize(img, mirror=flip, dtype=dtype, output_layout="HWC" if channels_last else "CHW",
                                   mean=[255 * m for m in aug.mean], std=[255 * s for s in aug.std])
    record = fn.stack(_float(flip) if aug.flip_p > 0 else _const(0.0), jittered, *factors, gray,
                      sigma * blurred, solarized, *(_float(t[k]) for t in (anchor, size, shape) for k in (0, 1)),
                      _float(order))
    return out, record


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def train_pipeline(reader: ReaderSpec, recipe: Recipe, device: str, channels_last: bool, hw_decoder_load: float,
                   debug: bool = False):
    """Outputs: view_0..view_{V-1}, index[, record_0..record_{V-1} when debug]."""
    jpegs, index = _read(reader)
    images = _decode(jpegs, device, hw_decoder_load)
    shape = fn.peek_image_shape(jpegs)  # H, W, C on the CPU, for the crop windows
    views, records = [], []
    for view in recipe.views():
        v, r = view_chain(images, shape, view, recipe.augment, channels_last=channels_last)
        views.append(v)
        records.append(r)
    return (*views, index, *records) if debug else (*views, index)


@pipeline_def(enable_checkpointing=True)
def eval_pipeline(reader: ReaderSpec, resize: int, crop: int, mean, std, device: str, channels_last: bool,
                  hw_decoder_load: float):
    """Resize the shorter side (bicubic, antialiased), centre crop, normalize."""
    jpegs, index = _read(reader)
    images = _decode(jpegs, device, hw_decoder_load)
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_CUBIC, antialias=True,
                       dtype=types.UINT8)
    out = fn.crop_mirror_normalize(images, crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5, dtype=types.FLOAT,
                                   output_layout="HWC" if channels_last else "CHW",
                                   mean=[255 * m for m in mean], std=[255 * s for s in std])
    return out, index


def record_dict(record: np.ndarray) -> dict:
    """One view's debug record as a dict of FLAG_FIELDS."""
    return {k: float(v) for k, v in zip(FLAG_FIELDS, np.asarray(record).reshape(-1))}
