"""Per-view draw statistics of the DALI graph, sharp enough that a probability off by 0.02 fails.

The records are what the graph applied (its debug outputs), for every view of the recipe, over
N = 12,800 samples per view (tiny images and views keep this a few seconds). A rate is checked
against the recipe's p within 4.5 binomial standard errors: 4.5 * sqrt(p(1-p)/N) is 0.0199 at
p = 0.5 and 0.0159 at p = 0.2, so an error of 0.02 in any probability fails (false alarm ~7e-6 per
check). Uniform factors: every draw inside the range, both ends reached to within 1% of its width
(a range drawn too narrow fails), and the mean within 4.5 standard errors of the midpoint.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from sslight_dali.run_config import load_config
from sslight_dali.data import build_train_loader
from sslight_dali.augment import jitter_orders, record_fields

BATCH, EPOCHS = 256, 50  # 256 images: one batch per epoch, 12,800 samples per view


@pytest.fixture(scope="module")
def tiny_pngs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_png")
    (root / "train" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(BATCH):
        h, w = rng.integers(12, 25, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "train" / "a" / f"{i:03d}.png")
    return root


def draws(root, *overrides):
    cfg = load_config("configs/dino/resnet18_sslight.yaml", [
        f"data.root={root}", "data.device=cpu", "data.num_threads=2", f"train.batch_size={BATCH}",
        "recipe.global.size=8", "recipe.local.size=8", *overrides])
    loader = build_train_loader(cfg, channels_last=False, debug=True)
    recs = [[] for _ in cfg.recipe.views()]
    for e in range(EPOCHS):
        for _, _, _, records in loader.epoch(e):
            for v, r in enumerate(records):
                recs[v].append(r.numpy())
    return cfg.recipe, [{k: np.concatenate(r)[:, i] for i, k in enumerate(record_fields())} for r in recs]


def check_rate(x: np.ndarray, p: float, what) -> None:
    n = len(x)
    tol = 4.5 * math.sqrt(p * (1 - p) / n)
    assert tol <= 0.02 or p in (0.0, 1.0)
    assert abs(x.mean() - p) <= tol + 1e-12, (what, x.mean(), p, tol)


def check_uniform(x: np.ndarray, lo: float, hi: float, what) -> None:
    width = hi - lo
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5, (what, x.min(), x.max(), lo, hi)
    assert x.min() < lo + 0.01 * width and x.max() > hi - 0.01 * width, (what, x.min(), x.max(), lo, hi)
    assert abs(x.mean() - (lo + hi) / 2) < 4.5 * width / math.sqrt(12 * len(x)), (what, x.mean())


@pytest.mark.parametrize("recipe_file", ["cnn_sslight"])
def test_every_view_draws_at_the_recipe_rates(tiny_pngs, recipe_file):
    recipe, recs = draws(tiny_pngs, f"data.recipe=pipelines/{recipe_file}.yaml")
    aug = recipe.augment
    for view, r in zip(recipe.views(), recs):
        assert len(r["flip"]) == BATCH * EPOCHS
        for flag, p in (("flip", aug.flip_p), ("jitter", aug.jitter_p), ("gray", aug.grayscale_p),
                        ("solarize", view.solarize_p)):
            check_rate(r[flag] > 0, p, (view.name, flag))
        check_rate(r["blur_sigma"] > 0, view.blur_p, (view.name, "blur"))
        blurred = r["blur_sigma"][r["blur_sigma"] > 0]
        if len(blurred) > 1000:
            check_uniform(blurred, *aug.blur_sigma, (view.name, "blur sigma"))
        for key, lo, hi in (("brightness", 1 - aug.brightness, 1 + aug.brightness),
                            ("contrast", 1 - aug.contrast, 1 + aug.contrast),
                            ("saturation", 1 - aug.saturation, 1 + aug.saturation),
                            ("hue_deg", -360 * aug.hue, 360 * aug.hue)):
            check_uniform(r[key], lo, hi, (view.name, key))
        # Crop windows inside the image, aspect within the recipe's ratio range.
        assert (r["crop_y"] >= 0).all() and (r["crop_y"] + r["crop_h"] <= r["image_h"]).all()
        assert (r["crop_x"] >= 0).all() and (r["crop_x"] + r["crop_w"] <= r["image_w"]).all()


def test_random_jitter_order_is_uniform_over_the_24_orders(tiny_pngs):
    recipe, recs = draws(tiny_pngs, "recipe.augment.jitter_order=random", "recipe.local.count=0")
    assert len(jitter_orders(recipe.augment)) == 24
    for view, r in zip(recipe.views(), recs):
        counts = np.bincount(r["jitter_perm"].astype(int), minlength=24)
        assert len(counts) == 24
        # Each order's share against 1/24 within 4.5 standard errors (0.0080 at N = 12,800).
        check_rate(r["jitter_perm"] == np.argmax(counts), 1 / 24, (view.name, "most frequent order"))
        check_rate(r["jitter_perm"] == np.argmin(counts), 1 / 24, (view.name, "least frequent order"))
