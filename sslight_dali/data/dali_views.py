"""The DALI graph of a view-sampling recipe: read, decode once, then per view a random resized crop,
the ops of the op table (sslight_dali/augment.py) and normalize. The same code builds the CPU and the
GPU graph; `device` switches the decoder and where the image operators run. Semantics follow the
torchvision/PIL reference (src/data/transforms.py:10-111); each function says where they differ.

Two chains. `jitter_order: fixed` (the default): the views of one size travel as one sequence per
image, and the colour ops (jitter, grayscale) give per-frame parameters to one colour pass with no
conditional, a frame without them getting identity parameters (group_chain, colour_pass).
`jitter_order: random` (torchvision's per-sample order): each view runs alone, and the jitter ops run
in slots chosen per sample with conditionals (view_chain, dali_ops.jitter_random_order); it is much
slower on the GPU (bench/README.md), hence the fixed default. The ops commute in exact arithmetic, so
the two orders differ only where a channel clips. An op with p == 0 is not in the graph and one with
p == 1 has no conditional.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode

from ..augment import FRAME_FIELDS, IDENTITY, OPS, record_fields
from ..config import Augment, Recipe, ViewSpec
from ..dali_ops import const, to_float
from ..data_formats import IMG_EXTENSIONS

READER = "Reader"
IMAGE_EXTS = ";".join(e.lstrip(".") for e in IMG_EXTENSIONS)  # WebDataset image members (any case)


@dataclass
class ReaderSpec:
    """What to read and how this process's shard is ordered; `storage` (the data format's, see
    sslight_dali/data_formats.py) picks the reader in READERS.

    "files": the file reader, whose "label" output carries the dataset index. "tar" (WebDataset):
    `files` are the tar shards and the index output is the sample's padded `source_info` bytes,
    which the loader maps back to the dataset index (see loader.py).
    """
    files: list[str]
    indices: list[int]          # dataset index of each file (file reader only)
    storage: str = "files"
    shard_id: int = 0
    num_shards: int = 1
    shuffle: bool = True        # reshuffle after every epoch (shards stay disjoint)
    seed: int = 0               # the same on every rank, so all ranks agree on the permutation
    index_files: list[str] | None = None  # WebDataset: one DALI index file per tar
    source_info_len: int = 0    # WebDataset: bytes of the longest source_info
    initial_fill: int = 1024    # WebDataset: shuffle buffer (encoded samples) per rank


def _read(spec: ReaderSpec):
    """(encoded bytes, index) of every sample, by the reader of the samples' storage."""
    return READERS[spec.storage](spec)


def _read_files(spec: ReaderSpec):
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


READERS = {"files": _read_files, "tar": _read_webdataset}  # by storage (sslight_dali/data_formats.py)


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
    return dmath.min(dmath.max(out, 0.0), 255.0)  # cheaper than math.clamp on the CPU (bench/README.md)


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
    window = dict(zip(FRAME_FIELDS, (t[k] for t in (anchor, size, shape) for k in (0, 1))))
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
    fields = record_fields()
    missing = [k for k in fields if k not in record]
    if missing:  # an op table entry lists a record field its DALI implementation does not fill
        raise RuntimeError(f"no op filled the record fields {missing}")
    return out, fn.stack(*(to_float(v) if isinstance(v, DataNode) else const(float(v)) for v in
                           (record[k] for k in fields)))


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

    # One operator splits the sequence into its frames (cheaper than a subscript per frame)
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
    return fn.stack(to_float(portrait * (size * h // w) + (1 - portrait) * size),
                    to_float(portrait * size + (1 - portrait) * (size * w // h)))


def _center_crop_pos(side, crop: int):
    """crop_pos (0-1) that puts the crop at torchvision CenterCrop's anchor round((side - crop) / 2)
    with Python's round (half to even: 72.5 -> 72), where crop_pos=0.5 rounds half up (73). DALI's
    anchor is round(crop_pos * (side - crop)), exact here because the ratio times its denominator
    lands within float rounding of an integer."""
    d = side - crop
    q = d // 2
    anchor = q + (d - 2 * q) * (q - 2 * (q // 2))  # q, plus 1 when d is odd and q odd (half to even)
    return to_float(anchor) / to_float(fn.cast(d > 0, dtype=types.INT64) * (d - 1) + 1)


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
    """One view's debug record as a dict by field name (augment.record_fields)."""
    return {k: float(v) for k, v in zip(record_fields(), np.asarray(record).reshape(-1))}
