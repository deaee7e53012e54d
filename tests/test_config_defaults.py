"""Shipped configs and recipes state only their differences from the typed defaults (or from their
`_base`): changing a default reaches every shipped config that does not set that key, and no shipped
file restates a value it would get anyway."""
from __future__ import annotations

import dataclasses

import pytest

from sslight_dali.config import (Augment, GlobalViews, LocalViews, ModelCfg, OptimCfg, Recipe, TrainCfg, ViewGroup,
                                 _deep_merge, find_file, read_chain, read_yaml, shipped_names, to_dict)
from sslight_dali.methods import METHODS
from sslight_dali.methods.dino import DinoCfg
from sslight_dali.methods.moco import MocoCfg
from sslight_dali.methods.swav import SwavCfg
from sslight_dali.run_config import config_class, load_config

CONFIGS = shipped_names("configs")
RECIPES = shipped_names("pipelines")
SWAV = {f"swav/{b}_{v}" for b in ("mobilenetv2", "resnet18", "resnet34") for v in ("baseline", "sslight")}
VIT = {"dino/vit_tiny_baseline", "dino/vit_tiny_sslight"}
# What names a run rather than tuning it: every config states these, even when equal to a default.
IDENTITY = {"method", "model.backbone", "data.recipe", "train.output_dir", "name"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def keys_set_by(config: str) -> dict:
    """{key: value} that a shipped config sets: itself, its bases, its recipe and the recipe's bases."""
    data, _ = read_chain(config, "configs")
    recipe, _ = read_chain(data["data"]["recipe"], "pipelines")
    return {**flatten(data), **flatten(recipe, "recipe.")}


def lookup(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, "global_" if part == "global" else part)
    return obj


def change_default(monkeypatch, cls, name: str, value) -> None:
    """As if the dataclass said `name = value`: the generated __init__ holds the defaults."""
    names = [f.name for f in dataclasses.fields(cls)]
    defaults = list(cls.__init__.__defaults__)
    assert len(defaults) == len(names)
    defaults[names.index(name)] = value
    monkeypatch.setattr(cls.__init__, "__defaults__", tuple(defaults))


def test_the_paper_configs_are_all_shipped():
    assert len(CONFIGS) == 20 and len(RECIPES) == 6


@pytest.mark.parametrize("key,cls,new,set_by", [
    ("train.epochs", TrainCfg, 7, set()),
    ("train.batch_size", TrainCfg, 32, set()),
    ("model.drop_path_rate", ModelCfg, 0.05, VIT),
    ("optim.min_lr", OptimCfg, 0.0123, VIT),
    ("optim.start_warmup_lr", OptimCfg, 0.01, SWAV),
    ("optim.lars_eta", OptimCfg, 0.002, set()),
    ("dino.warmup_teacher_temp_epochs", DinoCfg, 40, VIT),
    ("dino.center_momentum", DinoCfg, 0.8, set()),
    ("swav.queue_length", SwavCfg, 1920, set()),
    ("moco.temperature", MocoCfg, 0.3, set()),
    ("recipe.augment.hue", Augment, 0.05, SWAV),
    ("recipe.augment.solarize_threshold", Augment, 100, set()),
], ids=lambda x: x if isinstance(x, str) else None)
def test_a_changed_default_reaches_every_config_that_does_not_set_it(monkeypatch, key, cls, new, set_by):
    # A method's section is in the configs of that method only (and in the defaults with method=it).
    section = key.split(".")[0]
    own = [] if section not in METHODS else [f"method={section}"]
    configs = [c for c in CONFIGS if section not in METHODS or c.startswith(f"{section}/")]
    before = {c: lookup(load_config(c), key) for c in configs}
    change_default(monkeypatch, cls, key.rsplit(".", 1)[1], new)
    setters = {c for c in CONFIGS if key in keys_set_by(c)}
    assert setters == set_by
    for c in configs:
        got = lookup(load_config(c), key)
        assert got == (before[c] if c in setters else new), c
    assert lookup(load_config(None, own), key) == new


def _own_and_inherited(kind: str, name: str, defaults: dict) -> tuple[dict, dict]:
    raw = read_yaml(find_file(name, kind))
    bases = raw.pop("_base", [])
    inherited = defaults
    for base in [bases] if isinstance(bases, str) else bases:
        inherited = _deep_merge(inherited, read_chain(base, kind)[0])
    return flatten(raw), flatten(inherited)


@pytest.mark.parametrize("kind,name", [("configs", c) for c in CONFIGS] + [("pipelines", r) for r in RECIPES])
def test_no_shipped_file_restates_what_it_inherits(kind, name):
    # a config's defaults: those of its method's Config subclass (DinoConfig: with the dino section)
    method = read_chain(name, kind)[0].get("method", "dino") if kind == "configs" else None
    defaults = to_dict(config_class(method)()) if method else to_dict(Recipe())
    own, inherited = _own_and_inherited(kind, name, defaults)
    assert set(own) <= set(inherited), f"{name}: unknown keys {set(own) - set(inherited)}"
    restated = {k: v for k, v in own.items() if k not in IDENTITY and inherited[k] == v}
    assert not restated, f"{name} restates values it inherits: {restated}"


def test_only_the_swav_recipes_change_the_photometric_settings():
    own = {r: read_yaml(find_file(r, "pipelines")) for r in RECIPES}
    assert [r for r in RECIPES if "augment" in own[r]] == ["swav_sslight"]
    assert load_config("swav/resnet18_baseline").recipe.augment.hue == 0.2  # through its bases


def test_a_view_group_built_directly_has_its_kinds_probabilities():
    # The reference (sslight-reference.md 1.3, 7.2; DINO/MoCo): global 1 always blurred, never
    # solarized; global 2 blur 0.1, solarize 0.2; locals blur 0.5, no solarize. A group built in code
    # (the linear probe's, a test's) gets them without a recipe file.
    g, loc = GlobalViews(count=2, size=224, scale=[0.3, 1.0]), LocalViews(count=6, size=128, scale=[0.05, 0.3])
    assert (g.blur_p, g.solarize_p) == ([1.0, 0.1], [0.0, 0.2])
    assert (loc.blur_p, loc.solarize_p) == ([0.5], [0.0])
    views = Recipe(global_=g, local=loc).views()
    assert [(v.name, v.blur_p, v.solarize_p) for v in views] == \
        [("global1", 1.0, 0.0), ("global2", 0.1, 0.2)] + [(f"local{i}", 0.5, 0.0) for i in range(1, 7)]
    # the geometry defaults are each kind's too (SSLight CNN: 2 x 224 px at 0.3-1, 6 x 128 px at 0.05-0.3)
    assert (GlobalViews().count, GlobalViews().size, GlobalViews().scale) == (2, 224, [0.3, 1.0])
    assert (LocalViews().count, LocalViews().size, LocalViews().scale) == (6, 128, [0.05, 0.3])
    assert Recipe().global_ == GlobalViews() and Recipe().local == LocalViews()
    with pytest.raises(TypeError, match="blur_p"):  # a group that does not say its kind gets no guess
        ViewGroup(count=2, size=224, scale=[0.3, 1.0])
