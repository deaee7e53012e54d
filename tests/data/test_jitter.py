"""Colour jitter runs its ops in a random order per sample, as torchvision's ColorJitter does."""
import copy

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from nvidia.dali import fn, pipeline_def, types

from sslight_dali.augment import OPS, jitter_orders
from sslight_dali.run_config import load_config
from sslight_dali.dali_ops import jitter_random_order
from sslight_dali.synth import make_image

FACTORS = (1.4, 0.6, 1.5, 25.0)  # brightness, contrast, saturation, hue (deg): strong enough to clip


@pytest.fixture(scope="module")
def aug():
    return load_config("configs/dino/resnet18_sslight.yaml", ["recipe.augment.jitter_order=random"]).recipe.augment


@pytest.fixture(scope="module")
def photo():
    return make_image("disc", np.random.default_rng(1), 96, 96)


def jitter(photo, aug, orders, factors=FACTORS):
    """Jittered copies of `photo` with fixed factors, one per entry of `orders` (an index into
    jitter_orders(aug), or None: drawn per sample). Returns (images [n, H, W, 3], order indices)."""
    arr, n = np.asarray(photo), len(orders)
    drawn = orders[0] is None

    @pipeline_def(batch_size=n, num_threads=2, device_id=None, seed=7, enable_conditionals=True)
    def pipe():
        img = fn.external_source(source=lambda: [arr] * n, layout="HWC", batch=True)
        if drawn:
            k = fn.random.uniform(values=list(range(len(jitter_orders(aug)))), dtype=types.INT32)
        else:
            k = fn.external_source(source=lambda: [np.int32(o) for o in orders], batch=True)
        consts = [types.Constant(f, dtype=types.FLOAT, device="cpu") for f in factors]
        return jitter_random_order(img, jitter_orders(aug), k, *consts), k

    p = pipe()
    p.build()
    out, k = p.run()
    return out.as_array(), k.as_array().reshape(-1)


def test_each_sample_gets_the_image_of_its_order(aug, photo):
    # The order's distribution is the graph's (tests/data/test_stats.py checks its records); here:
    # the slots run exactly the order a sample holds.
    orders = jitter_orders(aug)
    assert len(orders) == 24
    refs, _ = jitter(photo, aug, list(range(24)))
    assert len({r.tobytes() for r in refs}) == 24  # every order gives a different image here
    n = 96
    out, k = jitter(photo, aug, [None] * n)
    assert all(np.array_equal(out[i], refs[k[i]]) for i in range(n))
    assert len(set(k.tolist())) > 12  # many different orders were exercised


def test_orders_mean_what_torchvision_means(aug, photo):
    # Hue off (DALI's YIQ hue is not PIL's HSV hue): the 6 orders of brightness, contrast,
    # saturation each match torchvision applying the same order, and no other order.
    aug = copy.deepcopy(aug)
    aug.hue = 0.0
    b, c, s, _ = FACTORS
    ops = {0: (F.adjust_brightness, b), 1: (F.adjust_contrast, c), 2: (F.adjust_saturation, s)}
    pil = []
    for order in jitter_orders(aug):
        img = photo
        for op in order:
            img = ops[op][0](img, ops[op][1])
        pil.append(np.asarray(img, np.float32))
    out, _ = jitter(photo, aug, list(range(6)), factors=(b, c, s, 0.0))
    for k in range(6):
        mae = [float(np.abs(out[k].astype(np.float32) - ref).mean()) for ref in pil]
        assert int(np.argmin(mae)) == k and mae[k] < 1.5, (k, mae)


def test_single_op_needs_no_order(aug, photo):
    aug = copy.deepcopy(aug)
    aug.contrast = aug.saturation = aug.hue = 0.0
    assert jitter_orders(aug) == [(0,)]
    out, _ = jitter(photo, aug, [0, 0])
    assert np.abs(out[0].astype(np.float32) - np.asarray(F.adjust_brightness(photo, 1.4), np.float32)).mean() < 0.6


def test_fixed_order_is_fused_and_means_brightness_contrast_saturation_hue(aug, photo):
    fixed = copy.deepcopy(aug)
    fixed.jitter_order = "fixed"
    assert jitter_orders(fixed) == [(0, 1, 2, 3)]
    out, k = jitter(photo, fixed, [None] * 4)
    assert (k == 0).all() and all(np.array_equal(o, out[0]) for o in out)
    # Two passes instead of four: the same image as the op-by-op chain in that order, except where
    # an intermediate clips (brightness 1.4 clips here).
    chain, _ = jitter(photo, aug, [jitter_orders(aug).index((0, 1, 2, 3))])
    err = float(np.abs(out[0].astype(np.float32) - chain[0]).mean())
    assert err < 3.0, err
    # And torchvision's meaning of that order (hue off: DALI's YIQ hue is not PIL's HSV hue).
    b, c, s, _ = FACTORS
    fixed.hue = 0.0
    out, _ = jitter(photo, fixed, [None], factors=(b, c, s, 0.0))
    ref = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(photo, b), c), s)
    others = [F.adjust_brightness(F.adjust_contrast(F.adjust_saturation(photo, s), c), b)]
    err = float(np.abs(out[0].astype(np.float32) - np.asarray(ref, np.float32)).mean())
    assert err < 3.0 and all(err < float(np.abs(out[0].astype(np.float32) - np.asarray(o, np.float32)).mean())
                             for o in others), err


@pytest.mark.parametrize("off", ["hue", "brightness"])
def test_torchvision_records_the_order_that_ran_among_the_enabled_ops(aug, photo, off):
    # SwAV's strengths with one op off: torchvision's randperm(4) still places that op, but the
    # record names the order of the ops that ran, as an index into jitter_orders(aug) (the DALI
    # record's meaning, checked against torchvision's ops above): replaying that order with the
    # recorded factors gives the backend's image exactly, and every one of the 3! orders occurs.
    aug = copy.deepcopy(aug)
    aug.brightness, aug.contrast, aug.saturation, aug.hue = 0.8, 0.8, 0.8, 0.2
    setattr(aug, off, 0.0)
    aug.jitter_p = 1.0
    orders = jitter_orders(aug)
    assert len(orders) == 6 and all(({"hue": 3, "brightness": 0}[off]) not in o for o in orders)
    op = next(o for o in OPS if o.name == "color_jitter")
    torch.manual_seed(0)
    seen, told_apart = set(), 0
    for _ in range(60):
        rec = {}
        out = np.asarray(op.torch(photo, None, aug, rec))
        k = int(rec["jitter_perm"])
        assert 0 <= k < len(orders), rec
        seen.add(k)
        fns = {0: (F.adjust_brightness, rec["brightness"]), 1: (F.adjust_contrast, rec["contrast"]),
               2: (F.adjust_saturation, rec["saturation"]),
               3: (F.adjust_hue, None if rec["hue_deg"] is None else rec["hue_deg"] / 360.0)}
        remakes = []
        for order in orders:
            img = photo
            for i in order:
                img = fns[i][0](img, fns[i][1])
            remakes.append(np.asarray(img))
        assert np.array_equal(out, remakes[k])
        told_apart += sum(np.array_equal(out, r) for r in remakes) == 1
    assert seen == set(range(6)) and told_apart >= 50, (seen, told_apart)
