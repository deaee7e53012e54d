"""DALI building blocks of the augmentation ops: per-sample coins and uniform draws, conditionals,
blur, solarize and colour jitter in a per-sample random order.

The DALI implementations in the op table (sslight_dali/augment.py) and the view graph
(sslight_dali/data/dali_views.py) both use them; this module imports nothing of the package, so
neither depends on the other through it. Random parameters are drawn on the CPU, where DALI's
conditionals and argument inputs need them.
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def const(v: float):
    """A float constant on the CPU, as a DataNode (so it can be stacked with drawn values)."""
    return types.Constant(v, dtype=types.FLOAT, device="cpu")


def to_float(x):
    return fn.cast(x, dtype=types.FLOAT)


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
        return const(lo) if n is None else types.Constant(np.full(n, lo, np.float32), device="cpu")
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
    return img, to_float(coin)


def _blur(img, sigma):
    # DALI's default window, 2*ceil(3*sigma)+1 taps per sample (3 to 13 for sigma in [0.1, 2]), sums
    # all but 0.3% of the kernel; a fixed 13-tap window gives the same images within 0.1 grey level
    # at more CPU time (tests/data/test_ops.py, bench/README.md).
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
        sigma = const(0.0)
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
    fused into one colour matrix (fn.hsv: cheaper than the two ops on the CPU). Both act on the
    chroma plane only, so fusing them changes the output only where saturation would have clipped."""
    for k in (0, 1):
        if k in ops:
            img = _jitter_op(img, k, factors)
    if 2 in ops or 3 in ops:
        img = fn.hsv(img, saturation=factors[2] if 2 in ops else 1.0, hue=factors[3] if 3 in ops else 0.0)
    return img


def jitter_random_order(img, orders: list[tuple[int, ...]], order, *factors):
    """Colour jitter on uint8 in the per-sample `order`, an index into `orders` (augment.jitter_orders:
    every order of the enabled ops, the identity first). Each op saturates like PIL's but rounds to
    nearest where PIL truncates: brightness, contrast and saturation together sit 0.7-1.3 grey levels
    above PIL on tests/data/test_ops.py's photo (the fixed-order colour_pass truncates)."""
    if len(orders) == 1:  # zero or one op: nothing to permute
        return _jitter_fused(img, orders[0], factors)
    ops = list(orders[0])
    for slot in range(len(ops)):
        slot_op = fn.lookup_table(order, keys=list(range(len(orders))), values=[o[slot] for o in orders],
                                  dtype=types.INT32)
        img = _jitter_slot(img, slot_op, ops, factors)
    return img
