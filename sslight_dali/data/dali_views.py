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
  saturation blends with luma, hue rotates by U(-360h, 360h) degrees. Fixed order brightness,
  contrast, saturation, hue; torchvision picks a random order per call. In DALI's linear colour model
  the four commute exactly (contrast/saturation keep luma, hue rotates the chroma plane), so the order
  only matters where a channel clips at 0/255; tests/test_data_parity.py measures the gap.
- grayscale: ITU-R 601 luma in 3 channels. Blur: sigma ~ U(blur_sigma), a window of
  2*ceil(3*sigma_max)+1 taps (13 for sigma 2; wider windows cost CPU time and change nothing).
  Solarize: v >= threshold -> 255 - v.
Per-sample probabilities use DALI conditionals, so unselected samples skip the op entirely; an op
with p == 0 is not in the graph and one with p == 1 has no conditional.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from ..config import Augment, Recipe, ViewSpec

READER = "Reader"
# Per-view debug record (float32): what the viewer and the parity tests need to know.
FLAG_FIELDS = ("flip", "jitter", "brightness", "contrast", "saturation", "hue_deg", "gray", "blur_sigma",
               "solarize", "crop_y", "crop_x", "crop_h", "crop_w", "image_h", "image_w")


@dataclass
class ReaderSpec:
    """What to read and how this process's shard is ordered."""
    files: list[str]
    indices: list[int]          # dataset index of each file; the reader's "label" output carries it
    shard_id: int = 0
    num_shards: int = 1
    shuffle: bool = True        # reshuffle the whole dataset after every epoch (shards stay disjoint)
    seed: int = 0               # the same on every rank, so all ranks agree on the permutation


def blur_window(sigma_max: float) -> int:
    return 2 * math.ceil(3 * sigma_max) + 1


def _read(spec: ReaderSpec):
    jpegs, index = fn.readers.file(
        files=spec.files, labels=spec.indices, name=READER, shard_id=spec.shard_id,
        num_shards=spec.num_shards, shuffle_after_epoch=spec.shuffle, seed=spec.seed,
        pad_last_batch=True)  # shards of equal length: every rank runs the same number of steps
    return jpegs, index


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


def _jitter(img, aug: Augment, b, c, s, h):
    """Colour jitter on uint8, so each op saturates and rounds like PIL's."""
    if aug.brightness > 0:
        img = fn.brightness(img, brightness=b)
    if aug.contrast > 0:
        img = _contrast(img, c)
    if aug.saturation > 0:
        img = fn.saturation(img, saturation=s)
    if aug.hue > 0:
        img = fn.hue(img, hue=h)
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
    img, jittered = _apply(aug.jitter_p, _jitter, img, aug, *factors)
    img, gray = _apply(aug.grayscale_p, lambda x: fn.saturation(x, saturation=0.0), img)
    lo, hi = aug.blur_sigma
    sigma = _uniform(lo, hi)
    img, blurred = _apply(view.blur_p, lambda x: fn.gaussian_blur(x, sigma=sigma, window_size=blur_window(hi)), img)
    img, solarized = _apply(view.solarize_p, _solarize, img, aug.solarize_threshold)

    flip = fn.random.coin_flip(probability=aug.flip_p, dtype=types.INT32) if aug.flip_p > 0 else 0
    out = fn.crop_mirror_normalize(img, mirror=flip, dtype=dtype, output_layout="HWC" if channels_last else "CHW",
                                   mean=[255 * m for m in aug.mean], std=[255 * s for s in aug.std])
    record = fn.stack(_float(flip) if aug.flip_p > 0 else _const(0.0), jittered, *factors, gray,
                      sigma * blurred, solarized, *(_float(t[k]) for t in (anchor, size, shape) for k in (0, 1)))
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
