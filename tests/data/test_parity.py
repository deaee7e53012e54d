"""Statistical parity of the DALI (CPU) graph with the torchvision reference on the same recipe.

Rates are checked against the recipe's p with a tolerance of 4.5 binomial standard errors,
4.5*sqrt(p(1-p)/n) (false alarm ~7e-6 per check). Crop area fraction and aspect ratio are compared
between the backends with a two-sample Kolmogorov-Smirnov test at alpha = 0.001
(D < 1.95*sqrt(2/n)).
"""
import math

import numpy as np
import pytest
import torch

from sslight_dali.augment import jitter_orders, record_fields
from sslight_dali.data import build_train_loader, list_samples
from sslight_dali.data.torch_views import ViewTransform, load_rgb

N_BATCHES, BATCH = 40, 32  # 1,280 samples per view, 2,560 per global/local group pair


@pytest.fixture(scope="module")
def records(synth_root):
    return _records(synth_root, "random")


@pytest.fixture(scope="module")
def fixed_records(synth_root):
    return _records(synth_root, "fixed")


@pytest.fixture(scope="module")
def hue_off_records(synth_root):
    # SwAV's strengths with hue off: 3 ops, 3! orders
    return _records(synth_root, "random", "recipe.augment.brightness=0.8", "recipe.augment.contrast=0.8",
                    "recipe.augment.saturation=0.8", "recipe.augment.hue=0", n_batches=10)


def _records(synth_root, order, *extra, n_batches=N_BATCHES):
    from sslight_dali.run_config import load_config
    cfg = load_config("configs/dino/resnet18_sslight.yaml", [
        f"data.root={synth_root}", "data.device=cpu", "data.num_threads=2", f"train.batch_size={BATCH}",
        "recipe.global.size=24", "recipe.local.size=12", f"recipe.augment.jitter_order={order}", *extra])
    views = cfg.recipe.views()
    loader = build_train_loader(cfg, debug=True)
    dali = [[] for _ in views]
    e = 0
    while len(dali[0]) < n_batches:
        for _, _, _, recs in loader.epoch(e):
            for v, r in enumerate(recs):
                dali[v].append(r.numpy())
        e += 1
    dali = [{k: np.concatenate(r)[:, i] for i, k in enumerate(record_fields())} for r in dali]

    torch.manual_seed(0)
    samples = list_samples(synth_root, "train")
    images = [load_rgb(samples, i) for i in range(len(samples))]
    ref = []
    for view in views:
        t, recs = ViewTransform(view, cfg.recipe.augment), []
        for n in range(n_batches * BATCH):
            rec = {}
            t(images[n % len(images)], rec)
            recs.append(rec)
        ref.append({k: np.array([float(r[k] or 0.0) if k in r else np.nan for r in recs]) for k in record_fields()})
    return cfg.recipe, views, dali, ref


def _rate_ok(x, p):
    n = len(x)
    tol = 4.5 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    return abs(x.mean() - p) <= tol + 1e-12, (x.mean(), p, tol)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["random", "fixed"])
def test_op_rates_match_recipe(request, order):
    # Both graphs: the random order's per-view conditionals, and the fixed order's sequences with
    # per-frame coins and identity parameters (whose records report the coins).
    recipe, views, dali, ref = request.getfixturevalue("records" if order == "random" else "fixed_records")
    aug = recipe.augment
    for v, view in enumerate(views):
        for name, backend in (("dali", dali[v]), ("torchvision", ref[v])):
            for flag, p in (("flip", aug.flip_p), ("jitter", aug.jitter_p), ("gray", aug.grayscale_p),
                            ("blur_sigma", view.blur_p), ("solarize", view.solarize_p)):
                ok, info = _rate_ok((backend[flag] > 0).astype(float), p)
                assert ok, (name, view.name, flag, info)
            sig = backend["blur_sigma"][backend["blur_sigma"] > 0]
            if len(sig) > 100:  # sigma ~ U(0.1, 2): mean 1.05, sd 0.55
                assert abs(sig.mean() - 1.05) < 4.5 * 0.55 / math.sqrt(len(sig)), (name, view.name, sig.mean())


def _ks(a, b):
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["global", "local"])
def test_crop_distributions_match_torchvision(records, kind):
    recipe, views, dali, ref = records
    idx = [i for i, v in enumerate(views) if v.kind == kind]
    stats = {}
    for name, backend in (("dali", dali), ("torchvision", ref)):
        rec = {k: np.concatenate([backend[i][k] for i in idx]) for k in record_fields()}
        area = rec["crop_h"] * rec["crop_w"] / (rec["image_h"] * rec["image_w"])
        stats[name] = (area, np.log(rec["crop_w"] / rec["crop_h"]))
        lo, hi = views[idx[0]].scale
        assert np.quantile(area, 0.02) >= lo * 0.8 and np.quantile(area, 0.98) <= min(1.0, hi * 1.2), name
    crit = 1.95 * math.sqrt(2 / len(stats["dali"][0]))
    for k, what in enumerate(("area fraction", "log aspect")):
        d = _ks(stats["dali"][k], stats["torchvision"][k])
        assert d < crit, (kind, what, d, crit)


@pytest.mark.slow
def test_jitter_factor_ranges(records):
    recipe, views, dali, ref = records
    aug = recipe.augment
    for name, backend in (("dali", dali[0]), ("torchvision", ref[0])):
        on = backend["jitter"] > 0
        for key, lo, hi in (("brightness", 1 - aug.brightness, 1 + aug.brightness),
                            ("contrast", 1 - aug.contrast, 1 + aug.contrast),
                            ("saturation", 1 - aug.saturation, 1 + aug.saturation),
                            ("hue_deg", -360 * aug.hue, 360 * aug.hue)):
            x = backend[key][on]
            assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5, (name, key)
            sd = (hi - lo) / math.sqrt(12)
            assert abs(x.mean() - (lo + hi) / 2) < 4.5 * sd / math.sqrt(len(x)), (name, key, x.mean())
        # Both draw the op order uniformly from the 24 (chi-square, 23 dof, alpha = 0.001).
        counts = np.bincount(backend["jitter_perm"][on].astype(int), minlength=24)
        assert len(counts) == 24 and (((counts - on.sum() / 24) ** 2) / (on.sum() / 24)).sum() < 49.7, (name, counts)


@pytest.mark.slow
def test_jitter_order_records_mean_the_same_orders_with_an_op_off(hue_off_records):
    # Both backends record the order that ran among the enabled ops (augment.jitter_orders): with hue
    # off, an index into its 3! orders, uniform (chi-square, 5 dof, alpha = 0.001); torchvision's own
    # randperm(4) would give 24 indices.
    recipe, views, dali, ref = hue_off_records
    n = len(jitter_orders(recipe.augment))
    assert n == 6
    for name, backend in (("dali", dali), ("torchvision", ref)):
        order = np.concatenate([b["jitter_perm"][b["jitter"] > 0] for b in backend]).astype(int)
        assert order.min() >= 0 and order.max() < n, (name, order.max())
        counts = np.bincount(order, minlength=n)
        assert (((counts - len(order) / n) ** 2) / (len(order) / n)).sum() < 20.52, (name, counts)
