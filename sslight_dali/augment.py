"""The augmentation-op table: every optional op of a view, one entry each.

A view is a random resized crop, then the ops below in table order (each with its own probability),
then normalization. An entry holds everything about its op: `knobs` (the dataclass of its recipe
fields, one value for all views: a base of `OpKnobs`, which config.py's `Augment` inherits),
`view_knobs` (the dataclass of its per-view probability lists: a base of `ViewOpKnobs`, which
`recipe.global`/`recipe.local` inherit; each kind's defaults are in config.py's GlobalViews and
LocalViews, each view's value in ViewSpec), `prob` (the knob that switches it off at 0), `record` (the
debug-record fields it fills, for `sslight views` and the parity tests), `name` (its ablation name in
`sslight bench pipeline --profile-ops`), `torch` (the torchvision/PIL implementation,
src/data/transforms.py:45-111) and `dali`, whose signature depends on `stage`, where the DALI graph
(data/dali_views.py) runs it:
    "mirror": folded into the final crop_mirror_normalize (the ops between are pointwise or
              symmetric, so flipping last equals flipping first). dali(aug) -> (mirror, record).
    "colour": parameters of the one colour pass a group of same-size views shares (brightness,
              contrast, saturation multiply, hue adds; IDENTITY is no change). dali(aug, n) ->
              (params, record), each value a float or a per-frame [n] DataNode. With
              `jitter_order: random` views run one by one: dali_view(img, aug) -> (img, record).
    "pixel":  on each view after the colour pass. dali(img, view, aug) -> (img, record).
A record value is a float or a DataNode (per sample, or per frame [n] for colour ops).

Adding an op: its knobs dataclass added to the bases of OpKnobs (or ViewOpKnobs), one entry in OPS,
and its parity test (README "Where a change goes"; tests/data/test_augment_table.py does it).
config.py imports this module, so torch, torchvision and DALI are imported by the implementations
when they run.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from PIL import ImageFilter, ImageOps

from .settings import setting, setting_list

# A view's record fields that no op owns: its crop window and source size.
FRAME_FIELDS = ("crop_y", "crop_x", "crop_h", "crop_w", "image_h", "image_w")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
IDENTITY = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}


def per_view(help: str) -> Any:
    """A per-view probability list (one per view, or one for all) without a default: each kind of view
    group states its own (config.GlobalViews, config.LocalViews)."""
    return field(metadata={"help": help})


# --- each op's knobs (recipe fields); an op's entry in OPS names its classes ---------------------
@dataclass
class FlipKnobs:
    flip_p: float = setting(0.5, 0.0, 1.0, "horizontal flip probability")


@dataclass
class ColorJitterKnobs:
    jitter_p: float = setting(0.8, 0.0, 1.0, "colour-jitter probability")
    brightness: float = setting(0.4, 0.0, 10.0)
    contrast: float = setting(0.4, 0.0, 10.0)
    saturation: float = setting(0.2, 0.0, 10.0)
    hue: float = setting(0.1, 0.0, 0.5, "torchvision hue factor; DALI gets U(-360h, 360h) degrees")
    jitter_order: Literal["random", "fixed"] = setting(
        "fixed", help="fixed = brightness, contrast, saturation, hue; random = a per-sample order, as torchvision "
                      "(much slower DALI GPU pipeline: per-slot conditionals; bench/README.md)")


@dataclass
class GrayscaleKnobs:
    grayscale_p: float = setting(0.2, 0.0, 1.0, "grayscale probability (ITU-R 601 luma)")


@dataclass
class BlurKnobs:
    blur_sigma: list[float] = setting_list([0.1, 2.0], "sigma ~ U(min, max), PIL GaussianBlur radius")


@dataclass
class BlurViewKnobs:
    blur_p: list[float] = per_view("Gaussian-blur probability: one per view, or one for all")


@dataclass
class SolarizeKnobs:
    solarize_threshold: int = setting(128, 0, 256, "pixels >= threshold are inverted")


@dataclass
class SolarizeViewKnobs:
    solarize_p: list[float] = per_view("solarize probability: one per view, or one for all")


# The bases in reverse table order: a dataclass takes its fields base by base from the last base to the
# first, so `recipe.augment` lists them in table order.
@dataclass
class OpKnobs(SolarizeKnobs, BlurKnobs, GrayscaleKnobs, ColorJitterKnobs, FlipKnobs):
    """Every op's one-for-all-views knobs: config.Augment inherits them (`recipe.augment`)."""


@dataclass
class ViewOpKnobs(SolarizeViewKnobs, BlurViewKnobs):
    """Every op's per-view probability lists, without defaults: config.ViewGroup inherits them."""


@dataclass(frozen=True)
class Op:
    name: str
    stage: Literal["mirror", "colour", "pixel"]
    knobs: type                # its dataclass of one-for-all-views knobs, a base of OpKnobs
    prob: str                  # the knob that switches the op off at 0 (ablations set it so)
    record: tuple[str, ...]
    torch: Callable
    dali: Callable
    label: Callable[[dict], str | None]
    dali_view: Callable | None = None
    view_knobs: type | None = None  # its dataclass of per-view probability lists, a base of ViewOpKnobs

    def knob_names(self) -> list[str]:
        return [f.name for cls in (self.knobs, self.view_knobs) if cls is not None for f in dataclasses.fields(cls)]

    def per_view(self) -> bool:
        """Whether the op's probability is a per-view list (recipe.global / recipe.local)."""
        return self.view_knobs is not None and self.prob in {f.name for f in dataclasses.fields(self.view_knobs)}

    def off(self) -> list[str]:
        """Config overrides that take the op out (an op with probability 0 is not in the DALI graph)."""
        if self.per_view():
            return [f"recipe.global.{self.prob}=[0]", f"recipe.local.{self.prob}=[0]"]
        return [f"recipe.augment.{self.prob}=0"]

    def disable(self, recipe) -> None:
        """Set the op's probabilities in `recipe` to 0, in place (the object form of off())."""
        if self.per_view():
            for g in (recipe.global_, recipe.local):
                setattr(g, self.prob, [0.0])
        else:
            setattr(recipe.augment, self.prob, 0.0)

    def used(self, recipe) -> bool:
        """Whether any view of `recipe` may apply the op."""
        if self.per_view():
            return any(p > 0 for g in (recipe.global_, recipe.local) if g.count for p in getattr(g, self.prob))
        return getattr(recipe.augment, self.prob) > 0


# --- torchvision/PIL implementations (the reference's order: crop, flip, jitter, gray, blur, solarize) ---
def _rand() -> float:
    import torch  # light: `sslight bench --help` loads this table (bench/sweeps.py) but not torch
    return torch.rand(()).item()


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand()


def _flip_torch(img, view, aug, rec):
    import torchvision.transforms.functional as F  # light: torchvision, as torch above
    rec["flip"] = _rand() < aug.flip_p
    return F.hflip(img) if rec["flip"] else img


def _jitter_torch(img, view, aug, rec):
    """torchvision ColorJitter: the four ops in a random order (or the fixed one), each its own factor."""
    import torchvision.transforms as T  # light: torchvision, as torch above
    import torchvision.transforms.functional as F
    rec["jitter"] = _rand() < aug.jitter_p
    if not rec["jitter"]:
        return img
    j = T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)
    order, b, c, s, h = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
    order = [0, 1, 2, 3] if aug.jitter_order == "fixed" else order.tolist()
    # randperm(4) also places the ops that are off (factor None); the order that ran is the others'
    ran = tuple(k for k in order if k in jitter_ops(aug))
    rec.update(brightness=b, contrast=c, saturation=s, hue_deg=None if h is None else 360.0 * h,
               jitter_perm=jitter_orders(aug).index(ran))
    ops = {0: (F.adjust_brightness, b), 1: (F.adjust_contrast, c), 2: (F.adjust_saturation, s), 3: (F.adjust_hue, h)}
    for k in order:
        fn, factor = ops[k]
        if factor is not None:
            img = fn(img, factor)
    return img


def _gray_torch(img, view, aug, rec):
    import torchvision.transforms.functional as F  # light: torchvision, as torch above
    rec["gray"] = _rand() < aug.grayscale_p
    return F.rgb_to_grayscale(img, num_output_channels=3) if rec["gray"] else img


def _blur_torch(img, view, aug, rec):
    rec["blur_sigma"] = 0.0
    if _rand() < view.blur_p:
        rec["blur_sigma"] = _uniform(*aug.blur_sigma)
        img = img.filter(ImageFilter.GaussianBlur(radius=rec["blur_sigma"]))
    return img


def _solarize_torch(img, view, aug, rec):
    rec["solarize"] = _rand() < view.solarize_p
    return ImageOps.solarize(img, threshold=aug.solarize_threshold) if rec["solarize"] else img


# --- DALI implementations -------------------------------------------------------------------------
def _dali():
    """sslight_dali.dali_ops, the DALI building blocks of these implementations."""
    from . import dali_ops  # optional: DALI, needed only once a DALI graph is built
    return dali_ops


def _flip_dali(aug):
    dali = _dali()
    if aug.flip_p <= 0:
        return 0, {"flip": 0.0}
    coin = dali.fn.random.coin_flip(probability=aug.flip_p, dtype=dali.types.INT32)
    return coin, {"flip": coin}


def jitter_ops(aug) -> list[int]:
    """The enabled jitter ops, as indices into JITTER_OPS."""
    return [k for k, name in enumerate(JITTER_OPS) if getattr(aug, name) > 0]


def jitter_orders(aug) -> list[tuple[int, ...]]:
    """Every order of the enabled ops (amount > 0), lexicographic; a view record's `jitter_perm` is
    the index into this list of the order that ran, on both backends. With all four enabled these are
    torchvision's 24 randperm(4) orders; an op that is off runs nowhere, so it has no place in an
    order (torchvision's randperm still places it: its record drops it, and each of the n! orders of
    the n enabled ops stays equally likely). `jitter_order: fixed` keeps only the identity order."""
    if aug.jitter_order == "fixed":
        return [tuple(jitter_ops(aug))]
    return list(itertools.permutations(jitter_ops(aug)))


def _jitter_factors(dali, aug, n):
    """brightness, contrast, saturation factors and hue in degrees, drawn for every sample or frame
    (cheap), so the record reports them even where the op is off."""
    return (dali.draw_uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness, n),
            dali.draw_uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast, n),
            dali.draw_uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation, n),
            dali.draw_uniform(-360.0 * aug.hue, 360.0 * aug.hue, n))


def _jitter_dali(aug, n):
    """Fixed order: each enabled factor where the frame's coin says jitter, the identity elsewhere."""
    dali = _dali()
    factors = _jitter_factors(dali, aug, n)
    ops = jitter_ops(aug)
    coin = dali.coins(aug.jitter_p, n) if ops else None
    params = {name: dali.gate(f, coin if k in ops else None, IDENTITY[name])
              for k, (name, f) in enumerate(zip(JITTER_OPS, factors))}
    record = dict(zip(("brightness", "contrast", "saturation", "hue_deg"), factors))
    record.update(jitter=0.0 if coin is None else coin, jitter_perm=0.0)
    return params, record


def _jitter_dali_view(img, aug):
    """Random order: one per-sample order, applied slot by slot (dali_ops.jitter_random_order)."""
    dali = _dali()
    factors = _jitter_factors(dali, aug, None)
    orders = jitter_orders(aug)
    perm = dali.fn.random.uniform(values=list(range(len(orders))), dtype=dali.types.INT32)
    img, applied = dali.apply_with_p(aug.jitter_p, dali.jitter_random_order, img, orders, perm, *factors)
    record = dict(zip(("brightness", "contrast", "saturation", "hue_deg"), factors))
    record.update(jitter=applied, jitter_perm=perm)
    return img, record


def _gray_dali(aug, n):
    """Grayscale is saturation 0, drawn with probability grayscale_p."""
    dali = _dali()
    keep = dali.coins(1 - aug.grayscale_p, n)
    if keep is None:
        return {"saturation": 0.0}, {"gray": 1.0}
    if isinstance(keep, int):
        return {}, {"gray": 0.0}
    return {"saturation": dali.to_float(keep)}, {"gray": 1 - keep}


def _gray_dali_view(img, aug):
    dali = _dali()
    img, applied = dali.apply_with_p(aug.grayscale_p, lambda x: dali.fn.saturation(x, saturation=0.0), img)
    return img, {"gray": applied}


def _blur_dali(img, view, aug):
    """Blur with probability p, sigma ~ U(blur_sigma) drawn only for the blurred samples. A per-sample
    conditional: on the CPU skipping the unselected samples costs less than an identity kernel on
    every sample (bench/README.md)."""
    img, sigma = _dali().blur_with_p(img, view.blur_p, *aug.blur_sigma)
    return img, {"blur_sigma": sigma}


def _solarize_dali(img, view, aug):
    """v >= threshold -> 255 - v with probability solarize_p. On the GPU a per-sample threshold (256
    where not drawn) runs every sample through one kernel with no conditional; on the CPU a conditional
    that skips the unselected samples costs less, since a per-sample threshold tensor takes DALI's
    slower tensor-tensor path there (bench/README.md)."""
    dali = _dali()
    thr = float(aug.solarize_threshold)
    if view.solarize_p <= 0:
        return img, {"solarize": 0.0}
    if view.solarize_p >= 1:
        return dali.solarize(img, thr), {"solarize": 1.0}
    if img.device == "cpu":
        # Both branches of a conditional must agree on the type (the random-order chain is uint8 here).
        img, applied = dali.apply_with_p(view.solarize_p, lambda x: dali.fn.cast_like(dali.solarize(x, thr), x), img)
        return img, {"solarize": applied}
    coin = dali.coins(view.solarize_p, None)
    return dali.solarize(img, (256.0 - coin * (256.0 - thr)).gpu()), {"solarize": coin}


# --- the table ------------------------------------------------------------------------------------
OPS: list[Op] = [
    Op("flip", "mirror", FlipKnobs, prob="flip_p",
       record=("flip",), torch=_flip_torch, dali=_flip_dali, label=lambda r: "flip" if r["flip"] else None),
    Op("color_jitter", "colour", ColorJitterKnobs, prob="jitter_p",
       record=("jitter", "brightness", "contrast", "saturation", "hue_deg", "jitter_perm"),
       torch=_jitter_torch, dali=_jitter_dali, dali_view=_jitter_dali_view,
       label=lambda r: "jit" if r["jitter"] else None),
    Op("grayscale", "colour", GrayscaleKnobs, prob="grayscale_p",
       record=("gray",), torch=_gray_torch, dali=_gray_dali, dali_view=_gray_dali_view,
       label=lambda r: "gray" if r["gray"] else None),
    Op("gaussian_blur", "pixel", BlurKnobs, view_knobs=BlurViewKnobs, prob="blur_p",
       record=("blur_sigma",), torch=_blur_torch, dali=_blur_dali,
       label=lambda r: f"blur{r['blur_sigma']:.1f}" if r["blur_sigma"] > 0 else None),
    Op("solarize", "pixel", SolarizeKnobs, view_knobs=SolarizeViewKnobs, prob="solarize_p",
       record=("solarize",), torch=_solarize_torch, dali=_solarize_dali,
       label=lambda r: "sol" if r["solarize"] else None),
]


def record_fields() -> tuple[str, ...]:
    """A view's debug record, in order: every op's fields, then the crop window."""
    return tuple(f for op in OPS for f in op.record) + FRAME_FIELDS


def ablations() -> dict[str, list[str]]:
    """Ablation name -> the overrides that take that op out, for every op in the table."""
    return {op.name: op.off() for op in OPS}


def ops_label(rec: dict) -> str:
    """The ops a view's record says were applied, short (the viewer's caption)."""
    return " ".join(s for s in (op.label(rec) for op in OPS) if s) or "-"
