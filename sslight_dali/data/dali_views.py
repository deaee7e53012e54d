"""The DALI graph of a view-sampling recipe: read -> decode once -> per view: crop, the ops of the op
table (sslight_dali/augment.py: flip, jitter, grayscale, blur, solarize), normalize. The same code
builds the CPU and the GPU graph; `device` only switches the decoder and where the image operators
run. Random parameters (coin flips, factors, crop windows) are always drawn on the CPU, where DALI's
conditionals and argument inputs need them.

Semantics follow the torchvision/PIL reference (src/data/transforms.py:10-111):
- crop: torchvision RandomResizedCrop window (area ~ U(scale), log-aspect ~ U(log ratio)), then a
  bicubic antialiased resize (PIL bicubic is antialiased when downscaling).
- flip: folded into crop_mirror_normalize. Every later op is pointwise or a symmetric blur, so
  flipping last equals flipping right after the crop.
- colour jitter, applied with p: brightness multiplies, contrast blends with the image's mean luma,
  saturation blends with luma, hue rotates by U(-360h, 360h) degrees. `jitter_order: fixed` (the
  default) runs them in that order (group_chain): all views of one size travel as one sequence per
  image, and the colour ops (jitter, grayscale) give per-frame parameters to one colour pass with no
  conditional, a frame without them getting identity parameters (brightness, contrast, saturation 1,
  hue 0; grayscale = saturation 0). Brightness and contrast are two uint8 passes that clip and
  truncate as PIL's blends do (DALI's colour ops round to nearest: a shift of just under half a
  level before rounding makes it truncate); saturation, hue and grayscale are one colour matrix
  (fn.hsv) computed in float, clipped to [0, 255] but not rounded, so those frames sit ~0.5 grey
  level above PIL's truncated saturation blend; fusing saturation and hue changes pixels only where
  saturation would have clipped.
  `jitter_order: random` is torchvision's: a random order per sample, uniform over the n! orders of
  `jitter_orders`, built from n slots, view by view (view_chain); a slot runs the op the sample's
  order puts there, chosen with conditionals, and each op rounds to nearest. The ops commute in
  exact arithmetic; the order matters where a channel clips, ~12 grey levels MAE between two orders
  with strong factors (measured with torchvision's ops). On the GPU the slots' conditionals made the
  pipeline 4.4x slower (bench/README.md), hence the fixed default.
- grayscale: ITU-R 601 luma in 3 channels. Blur: sigma ~ U(blur_sigma), a window of
  2*ceil(3*sigma)+1 taps per sample. Solarize: v >= threshold -> 255 - v (on the GPU a per-sample
  threshold, 256 when not drawn; on the CPU a per-sample conditional, which costs less there).
Blur keeps a per-sample conditional (unselected samples skip it: on the CPU that beat an identity
kernel on every sample), as do the colour ops of the random-order chain; an op with p == 0 is not in
the graph and one with p == 1 has no conditional.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode

from ..augment import IDENTITY, OPS, jitter_ops, jitter_orders, record_fields
from ..config import Augment, Recipe, ViewSpec
from .sources import IMG_EXTENSIONS

READER = "Reader"
IMAGE_EXTS = ";".join(e.lstrip(".") for e in IMG_EXTENSIONS)  # WebDataset image members (any case)
# Per-view debug record (float32), by name: what the viewer and the parity tests need to know. Each op
# of the table (sslight_dali/augment.py) owns its fields. jitter_order, on both backends: the index of the
# order that ran in jitter_orders(aug), the orders of the enabled ops only (augment.jitter_orders).
FLAG_FIELDS = record_fields()


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


def _read(spec: ReaderSpec):
    if spec.index_files is not None:
        return _read_webdataset(spec)
    jpegs, index = fn.readers.file(
        files=spec.files, labels=spec.indices, name=READER, shard_id=spec.shard_id,
        num_shards=spec.num_shards, shuffle_after_epoch=spec.shuffle, seed=spec.seed,
        pad_last_batch=True)  # with drop_last every shard then runs the same number of full batches
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
    # adjust_orientation=False: pixels as stored, EXIF orientation ignored, as PIL's Image.open (the
    # torchvision backend and the reference) does. 16-bit samples become round(v * 255 / 65535), which
    # the torchvision backend matches (torch_views.load_rgb).
    if device == "gpu":
        # Padding hints avoid reallocations while nvJPEG's buffers grow to the largest image.
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 device_memory_padding=211025920, host_memory_padding=140544512,
                                 adjust_orientation=False)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False)


def _shape(jpegs):
    """H, W, C of each encoded image on the CPU (for the crop windows), orientation as decoded."""
    return fn.peek_image_shape(jpegs, adjust_orientation=False)


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _const(v: float):
    return types.Constant(v, dtype=types.FLOAT, device="cpu")  # a DataNode, so it can be stacked


def _float(x):
    return fn.cast(x, dtype=types.FLOAT)


# --- helpers for the ops' DALI implementations (sslight_dali/augment.py) ----------------------------
def coins(p: float, n: int | None):
    """Per-frame coins [n] (per-sample scalars when n is None), INT32 0/1 with probability p; None when
    p == 0, 1 when p == 1."""
    if p <= 0:
        return None
    if p >= 1:
        return 1
    return fn.random.coin_flip(probability=p, shape=[] if n is None else [n], dtype=types.INT32)


def draw_uniform(lo: float, hi: float, n: int | None):
    """U(lo, hi) per frame [n] (per sample when n is None)."""
    if hi <= lo:  # an op switched off (amount 0): DALI refuses an empty range
        return _const(lo) if n is None else types.Constant(np.full(n, lo, np.float32), device="cpu")
    return fn.random.uniform(range=[lo, hi], shape=[] if n is None else [n], dtype=types.FLOAT)


def gate(factor, coin, identity: float):
    """`factor` where coin is 1, `identity` (1 or 0) where it is 0; coin None: never, 1: always."""
    if coin is None:
        return identity
    if isinstance(coin, int):
        return factor
    return factor ** coin if identity == 1.0 else factor * coin


def apply_with_p(p: float, op, img, *extra):
    """Run `op(img, *extra)` on a per-sample coin with probability p (a conditional when 0 < p < 1).
    Returns (img, applied flag)."""
    if p <= 0:
        return img, 0.0
    if p >= 1:
        return op(img, *extra), 1.0
    coin = _coin(p)
    if coin:
        img = op(img, *extra)
    return img, _float(coin)


def _blur(img, sigma):
    # DALI's default window, 2*ceil(3*sigma)+1 taps per sample (3 to 13 for sigma in [0.1, 2]), sums
    # all but 0.3% of the kernel. A fixed 13-tap window cost 1.4x the CPU time for the same images
    # within 0.1 grey level (tests/test_data_ops.py).
    return fn.gaussian_blur(img, sigma=sigma)


def blur_with_p(img, p: float, lo: float, hi: float):
    """Blur with probability p, sigma ~ U(lo, hi) drawn only for the blurred samples (a per-sample
    conditional when 0 < p < 1). Returns (image, sigma applied, 0 where not blurred)."""
    if p <= 0:
        return img, 0.0
    if p >= 1:
        sigma = draw_uniform(lo, hi, None)
        return _blur(img, sigma), sigma
    if _coin(p):
        sigma = draw_uniform(lo, hi, None)
        img = _blur(img, sigma)
    else:
        sigma = _const(0.0)
    return img, sigma


def solarize(img, threshold):
    """v >= threshold -> 255 - v, as |255 m - v| with m the 0/1 mask (4 passes, float out; exact on
    integers, so a uint8 input gives PIL's values; threshold 256 = off)."""
    return dmath.abs((img >= threshold) * 255.0 - img)


# --- colour jitter, random order (the per-view chain) ---------------------------------------------
def _mean_luma(img):
    """Mean ITU-R 601 luma per sample, from the per-channel means (one read of the image, no grey
    copy). PIL averages per-pixel rounded luma and rounds the mean: within 0.5 grey level of this."""
    m = fn.reductions.mean(img, axes=[0, 1])
    return m[0] * 0.299 + m[1] * 0.587 + m[2] * 0.114


def _contrast(img, factor):
    """torchvision/PIL contrast: blend with a flat image of the mean luma."""
    mean = _mean_luma(img)
    if img.device == "gpu":
        # Argument inputs must live on the CPU and this mean is on the GPU: blend with arithmetic.
        return fn.cast(img * factor.gpu() + mean * (1.0 - factor).gpu(), dtype=types.UINT8)
    # One pass: out = center + factor * (in - center), rounded and saturated to uint8.
    return fn.brightness_contrast(img, contrast=factor, contrast_center=mean)


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


def _jitter_fused(img, ops: tuple[int, ...], factors):
    """The ops in canonical order (brightness, contrast, saturation, hue), with saturation and hue
    fused into one colour matrix (fn.hsv: half the cost of the two ops on the CPU). Both act on the
    chroma plane only, so fusing them changes the output only where saturation would have clipped."""
    for k in (0, 1):
        if k in ops:
            img = _jitter_op(img, k, factors)
    if 2 in ops or 3 in ops:
        img = fn.hsv(img, saturation=factors[2] if 2 in ops else 1.0, hue=factors[3] if 3 in ops else 0.0)
    return img


def jitter_random_order(img, aug: Augment, order, *factors):
    """Colour jitter on uint8, in the per-sample `order` (an index into jitter_orders(aug)). Each op
    saturates like PIL's but rounds to nearest where PIL truncates: brightness, contrast and
    saturation together sit 0.7-1.3 grey levels above PIL on tests/test_data_ops.py's photo (the
    fixed-order colour_pass truncates)."""
    orders = jitter_orders(aug)
    if len(orders) == 1:  # zero or one op: nothing to permute
        return _jitter_fused(img, orders[0], factors)
    for slot in range(len(orders[0])):
        slot_op = fn.lookup_table(order, keys=list(range(len(orders))), values=[o[slot] for o in orders],
                                  dtype=types.INT32)
        img = _jitter_slot(img, slot_op, jitter_ops(aug), factors)
    return img


# --- the fixed-order colour pass (a group of same-size views as one sequence) ----------------------
def _pf(x):
    return fn.per_frame(x) if isinstance(x, DataNode) else x


# PIL's blends truncate to uint8 (100 x 1.009 -> 100); DALI's colour ops round to nearest. Shifting
# by just under half a level before DALI's rounding truncates as PIL does, and leaves integers
# (factor 1: the identity) unchanged.
TRUNCATE = -0.499 / 255  # brightness_shift is in units of the uint8 range


def _contrast_frames(seq, contrast, center, arithmetic: bool):
    """Blend each frame with its mean luma `center` ([F, 1, 1, 1]), truncating to uint8. On the GPU
    the mean is a GPU tensor and argument inputs must live on the CPU, so the blend is arithmetic
    there (a float expression, then a rounding cast: the same truncation by the same shift)."""
    if not arithmetic:
        return fn.brightness_contrast(seq, contrast=_pf(contrast), contrast_center=fn.per_frame(center),
                                      brightness_shift=TRUNCATE)
    if isinstance(contrast, DataNode):
        contrast = fn.reshape(contrast, shape=[-1, 1, 1, 1])
        contrast = contrast.gpu() if seq.device == "gpu" else contrast
    return fn.cast(center + contrast * (seq - center) + 255 * TRUNCATE, dtype=types.UINT8)


def colour_pass(seq, brightness, contrast, saturation, hue):
    """The colour ops on an FHWC uint8 sequence, in torchvision's fixed order; each parameter is a float
    or a per-frame [F] DataNode (hue in degrees). Brightness, then contrast (blending with the mean
    luma of the brightened frame), each rounding and clipping to uint8 as PIL does (truncating); then
    saturation and hue as one colour matrix (fn.hsv; it differs from the two ops only where
    saturation clips), in float and clipped to [0, 255] but not rounded: converting back to uint8
    cost more than the matrix itself on the CPU. Float out."""
    seq = fn.brightness_contrast(seq, brightness=_pf(brightness), brightness_shift=TRUNCATE)
    # mean luma per frame, [F, 1, 1, 1]: one reduction, one 1x3 matrix
    center = fn.coord_transform(fn.reductions.mean(seq, axes=[1, 2], keep_dims=True), M=[0.299, 0.587, 0.114])
    seq = _contrast_frames(seq, contrast, center, arithmetic=seq.device == "gpu")
    out = fn.hsv(seq, saturation=_pf(saturation), hue=_pf(hue), dtype=types.FLOAT)
    return dmath.min(dmath.max(out, 0.0), 255.0)  # 3x cheaper than math.clamp on the CPU


def _combine(params: dict, extra: dict) -> dict:
    """Fold one op's colour parameters into the pass's: hue adds, the others multiply; an identity
    factor adds no operator."""
    out = dict(params)
    for k, v in extra.items():
        if isinstance(out[k], float) and out[k] == IDENTITY[k]:
            out[k] = v
        elif not (isinstance(v, float) and v == IDENTITY[k]):
            out[k] = out[k] + v if k == "hue" else out[k] * v
    return out


def _is_identity(params: dict) -> bool:
    return all(isinstance(v, (int, float)) and v == IDENTITY[k] for k, v in params.items())


# --- a view's chain -----------------------------------------------------------------------------------
def _crop(images, shape, view: ViewSpec, aug: Augment):
    """torchvision RandomResizedCrop's window, bicubic (antialiased) resize to the view's size, uint8.
    Returns (crop, record of the window)."""
    anchor, size = fn.random_crop_generator(shape, random_area=list(view.scale), random_aspect_ratio=list(aug.ratio))
    interp = types.INTERP_CUBIC if aug.interpolation == "bicubic" else types.INTERP_LINEAR
    start = anchor + 0.0  # float, as resize's ROI wants it
    img = fn.resize(images, roi_start=start, roi_end=start + size, size=[view.size, view.size],
                    interp_type=interp, antialias=True, dtype=types.UINT8)
    window = dict(zip(("crop_y", "crop_x", "crop_h", "crop_w", "image_h", "image_w"),
                      (t[k] for t in (anchor, size, shape) for k in (0, 1))))
    return img, window


def _finish(img, view: ViewSpec, aug: Augment, record: dict, *, channels_last: bool, dtype):
    """The pixel ops of the table, then flip + normalize in one crop_mirror_normalize; returns
    (view, stacked debug record)."""
    for op in OPS:
        if op.stage == "pixel":
            img, r = op.dali(img, view, aug)
            record.update(r)
    mirror = 0
    for op in OPS:
        if op.stage == "mirror":
            mirror, r = op.dali(aug)
            record.update(r)
    out = fn.crop_mirror_normalize(img, mirror=mirror, dtype=dtype, output_layout="HWC" if channels_last else "CHW",
                                   mean=[255 * m for m in aug.mean], std=[255 * s for s in aug.std])
    missing = [k for k in FLAG_FIELDS if k not in record]
    if missing:  # an op table entry lists a record field its DALI implementation does not fill
        raise RuntimeError(f"no op filled the record fields {missing}")
    return out, fn.stack(*(_float(v) if isinstance(v, DataNode) else _const(float(v)) for v in
                           (record[k] for k in FLAG_FIELDS)))


def view_chain(images, shape, view: ViewSpec, aug: Augment, *, channels_last: bool, dtype=types.FLOAT):
    """One view of every image in the batch, each op applying itself per sample (the random jitter
    order); returns (view, debug record)."""
    img, record = _crop(images, shape, view, aug)
    for op in OPS:
        if op.stage == "colour":
            img, r = op.dali_view(img, aug)
            record.update(r)
    return _finish(img, view, aug, record, channels_last=channels_last, dtype=dtype)


def group_chain(images, shape, views: list[ViewSpec], aug: Augment, *, channels_last: bool, dtype=types.FLOAT):
    """Views of one size (the globals, or the locals), fixed jitter order; returns ([view], [record]).

    Each view gets its own crop; the crops travel as one FHWC sequence per image through the colour
    ops, which give per-frame parameters to one colour pass for the group (no conditionals: a frame
    without an op gets its identity parameters). The pixel ops and the flip then run view by view."""
    n = len(views)
    crops, windows = zip(*(_crop(images, shape, view, aug) for view in views))
    params, frames = dict(IDENTITY), {}
    for op in OPS:
        if op.stage == "colour":
            p, r = op.dali(aug, n)
            params = _combine(params, p)
            frames.update(r)
    seq = fn.stack(*crops, axis_name="F")
    if not _is_identity(params):  # nothing to apply: stay uint8
        seq = colour_pass(seq, **params)

    # One operator splits the sequence into its frames (a subscript per frame cost 5x the CPU time)
    split = fn.element_extract(seq, element_map=list(range(n)))
    split = [split] if isinstance(split, DataNode) else split
    outs, records = [], []
    for i, view in enumerate(views):
        record = dict(windows[i])
        record.update({k: v[i] if isinstance(v, DataNode) else v for k, v in frames.items()})
        out, rec = _finish(split[i], view, aug, record, channels_last=channels_last, dtype=dtype)
        outs.append(out)
        records.append(rec)
    return outs, records


def _groups(views: list[ViewSpec]) -> list[list[ViewSpec]]:
    """Consecutive views of the same kind (and so the same size)."""
    return [list(g) for _, g in itertools.groupby(views, key=lambda v: v.kind)]


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def train_pipeline(reader: ReaderSpec, recipe: Recipe, device: str, channels_last: bool, hw_decoder_load: float,
                   debug: bool = False):
    """Outputs: view_0..view_{V-1}, index[, record_0..record_{V-1} when debug].

    The fixed jitter order runs each group of same-size views as one sequence (group_chain); the
    random order needs a per-sample conditional per op slot, so it runs view by view (view_chain)."""
    jpegs, index = _read(reader)
    images = _decode(jpegs, device, hw_decoder_load)
    shape = _shape(jpegs)
    views, records = [], []
    if recipe.augment.jitter_order == "fixed":
        for group in _groups(recipe.views()):
            v, r = group_chain(images, shape, group, recipe.augment, channels_last=channels_last)
            views += v
            records += r
    else:
        for view in recipe.views():
            v, r = view_chain(images, shape, view, recipe.augment, channels_last=channels_last)
            views.append(v)
            records.append(r)
    return (*views, index, *records) if debug else (*views, index)


def _resize_shorter_like_torchvision(shape, size: int):
    """[H, W] of torchvision's Resize(size): the shorter side becomes `size`, the longer
    int(size * long / short) (truncated; DALI's resize_shorter rounds it, 347 px instead of 346 for
    a 363x492 image). Integer arithmetic: size * long // short is that truncation exactly."""
    h, w = shape[0], shape[1]
    portrait = h > w
    return fn.stack(_float(portrait * (size * h // w) + (1 - portrait) * size),
                    _float(portrait * size + (1 - portrait) * (size * w // h)))


def _center_crop_pos(side, crop: int):
    """crop_pos (0-1) that puts the crop at torchvision CenterCrop's anchor round((side - crop) / 2)
    with Python's round (half to even: 72.5 -> 72), where crop_pos=0.5 rounds half up (73). DALI's
    anchor is round(crop_pos * (side - crop)), exact here because the ratio times its denominator
    lands within float rounding of an integer."""
    d = side - crop
    q = d // 2
    anchor = q + (d - 2 * q) * (q - 2 * (q // 2))  # q, plus 1 when d is odd and q odd (half to even)
    return _float(anchor) / _float(fn.cast(d > 0, dtype=types.INT64) * (d - 1) + 1)


@pipeline_def(enable_checkpointing=True)
def eval_pipeline(reader: ReaderSpec, resize: int, crop: int, mean, std, device: str, channels_last: bool,
                  hw_decoder_load: float):
    """torchvision's Resize(resize, bicubic) + CenterCrop(crop) + Normalize: the same resized size
    and crop anchor per sample (bicubic, antialiased)."""
    jpegs, index = _read(reader)
    images = _decode(jpegs, device, hw_decoder_load)
    shape = fn.cast(_shape(jpegs), dtype=types.INT64)  # H, W, C as decoded (EXIF ignored), on the CPU
    hw = _resize_shorter_like_torchvision(shape, resize)
    images = fn.resize(images, size=hw, interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8)
    side = fn.cast(hw, dtype=types.INT64)
    out = fn.crop_mirror_normalize(images, crop=(crop, crop), crop_pos_y=_center_crop_pos(side[0], crop),
                                   crop_pos_x=_center_crop_pos(side[1], crop), dtype=types.FLOAT,
                                   output_layout="HWC" if channels_last else "CHW",
                                   mean=[255 * m for m in mean], std=[255 * s for s in std])
    return out, index


def record_dict(record: np.ndarray) -> dict:
    """One view's debug record as a dict of FLAG_FIELDS."""
    return {k: float(v) for k, v in zip(FLAG_FIELDS, np.asarray(record).reshape(-1))}
