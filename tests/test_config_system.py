"""Behaviour of the config system (sslight_dali/config.py): defaults, overrides, errors, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from sslight_dali.config import Config, ConfigError, dump_config, save_config
from sslight_dali.run_config import load_config

REPO = Path(__file__).resolve().parent.parent
DINO_R18 = REPO / "configs" / "dino" / "resnet18_baseline.yaml"
ALL_CONFIGS = sorted((REPO / "configs").glob("*/*.yaml"))


def _error(path=DINO_R18, overrides=()) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, list(overrides))
    return str(exc.value)


# ------------------------------------------------------------------------------------------ defaults
def test_defaults_load_without_a_file():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.method == "dino"
    assert cfg.train.batch_size == 128 and cfg.train.epochs == 200
    # The default recipe file is read and merged (so the resolved config is self-contained).
    assert cfg.recipe.name != "unnamed"
    assert len(cfg.recipe.views()) == cfg.recipe.global_.count + cfg.recipe.local.count


def test_defaults_without_a_recipe_file_use_the_builtin_recipe():
    cfg = load_config(None, ["data.recipe="])
    assert cfg.recipe == Config().recipe


def test_config_file_merges_over_defaults_and_keeps_unset_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\ndata:\n  recipe: pipelines/cnn_baseline.yaml\n")
    cfg = load_config(p)
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == Config().train.batch_size  # same section, not set: default
    assert cfg.recipe.name == "cnn_baseline"


# ------------------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize("override,key,expected,typ", [
    ("train.batch_size=64", "train.batch_size", 64, int),
    ("optim.base_lr=0.5", "optim.base_lr", 0.5, float),
    ("optim.base_lr=1", "optim.base_lr", 1.0, float),          # an int is accepted for a float field
    ("train.compile=true", "train.compile", True, bool),
    ("train.joint_linear_probe=false", "train.joint_linear_probe", False, bool),
    ("optim.betas=[0.8,0.95]", "optim.betas", [0.8, 0.95], list),
    ("train.output_dir=runs/x y", "train.output_dir", "runs/x y", str),
    ("method=swav", "method", "swav", str),
    ("optim.min_lr=1e-6", "optim.min_lr", 1e-6, float),       # YAML 1.1 reads 1e-6 as a string
    ("optim.weight_decay=2.5E-5", "optim.weight_decay", 2.5e-5, float),
], ids=lambda x: x if isinstance(x, str) else None)
def test_override_types(override, key, expected, typ):
    cfg = load_config(DINO_R18, [override])
    section, name = key.split(".") if "." in key else (None, key)
    got = getattr(getattr(cfg, section), name) if section else getattr(cfg, name)
    assert got == expected
    assert type(got) is typ
    if typ is list:
        assert all(type(x) is float for x in got)


def test_override_wins_over_file_and_later_override_wins():
    cfg = load_config(DINO_R18, ["train.epochs=5", "train.epochs=7"])
    assert cfg.train.epochs == 7


def test_override_reaches_into_recipe():
    cfg = load_config(DINO_R18, ["recipe.local.size=128", "recipe.local.count=4",
                                 "recipe.augment.hue=0.05"])
    assert cfg.recipe.local.size == 128
    assert cfg.recipe.augment.hue == 0.05
    locals_ = [v for v in cfg.recipe.views() if v.kind == "local"]
    assert len(locals_) == 4 and all(v.size == 128 for v in locals_)
    # keys of the recipe not overridden keep the recipe file's values
    assert cfg.recipe.global_.scale == [0.14, 1.0]


def test_scalar_override_of_per_view_list_broadcasts():
    cfg = load_config(DINO_R18, ["recipe.global.blur_p=0.5"])
    assert cfg.recipe.global_.blur_p == [0.5]
    assert [v.blur_p for v in cfg.recipe.views() if v.kind == "global"] == [0.5, 0.5]


def test_recipe_override_by_path():
    cfg = load_config(DINO_R18, ["data.recipe=pipelines/vit_sslight.yaml"])
    assert cfg.recipe.name == "vit_sslight" and cfg.recipe.local.count == 10


def test_scientific_notation_in_yaml_file_is_a_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  weight_decay: 1e-6\n  min_lr: 5e-4\ndata:\n  recipe: pipelines/cnn_sslight.yaml\n")
    cfg = load_config(p)
    assert cfg.optim.weight_decay == 1e-6 and type(cfg.optim.weight_decay) is float
    assert cfg.optim.min_lr == 5e-4


# ------------------------------------------------------------------------------------------ errors
def test_unknown_override_key_suggests_closest():
    msg = _error(overrides=["train.batch_sise=3"])
    assert "train.batch_sise" in msg
    assert "train.batch_size" in msg


def test_unknown_key_in_file_is_named_with_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  base_lrr: 0.1\ndata:\n  recipe: pipelines/cnn_sslight.yaml\n")
    msg = _error(p)
    assert "optim.base_lrr" in msg
    assert "base_lr'" in msg


def test_unknown_section_is_named():
    msg = _error(overrides=["trian.epochs=3"])
    assert "trian.epochs" in msg and "train.epochs" in msg


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("train.compile=3", "train.compile"),
    ("optim.base_lr=fast", "optim.base_lr"),
    ("train.output_dir=[1,2]", "train.output_dir"),
    ("recipe.local.size=big", "recipe.local.size"),
])
def test_wrong_type_names_the_key(override, key):
    assert key in _error(overrides=[override])


@pytest.mark.parametrize("override,key,rng", [
    ("train.batch_size=0", "train.batch_size", "[1, inf]"),
    ("recipe.augment.flip_p=1.5", "recipe.augment.flip_p", "[0.0, 1.0]"),
    ("dino.center_momentum=-0.1", "dino.center_momentum", "[0.0, 1.0]"),
    ("recipe.augment.hue=0.6", "recipe.augment.hue", "[0.0, 0.5]"),
])
def test_out_of_range_names_key_and_range(override, key, rng):
    msg = _error(overrides=[override])
    assert key in msg
    assert rng in msg


@pytest.mark.parametrize("override,choices", [
    ("method=byol", ["dino", "swav", "moco"]),
    ("optim.name=sgd", ["lars", "adamw"]),
    ("recipe.augment.interpolation=nearest", ["bicubic", "bilinear"]),
])
def test_bad_choice_lists_choices(override, choices):
    msg = _error(overrides=[override])
    assert override.split("=")[0] in msg
    for c in choices:
        assert c in msg


def test_malformed_override_without_equals():
    msg = _error(overrides=["train.batch_size"])
    assert "train.batch_size" in msg and "=" in msg


def test_missing_config_file_names_path(tmp_path):
    p = tmp_path / "nope.yaml"
    assert str(p) in _error(p)


def test_missing_recipe_file_names_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  recipe: pipelines/does_not_exist.yaml\n")
    assert "pipelines/does_not_exist.yaml" in _error(p)
    assert "elsewhere/missing_recipe.yaml" in _error(overrides=["data.recipe=elsewhere/missing_recipe.yaml"])


def test_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  epochs: [1, 2\n")
    assert str(p) in _error(p)


def test_invalid_recipe_yaml_names_file(tmp_path):
    r = tmp_path / "recipe.yaml"
    r.write_text("global: {count: 2\n")
    p = tmp_path / "c.yaml"
    p.write_text(f"data:\n  recipe: {r}\n")
    assert str(r) in _error(p)


@pytest.mark.parametrize("override,key", [
    ("recipe.global.blur_p=[1.0,0.1,0.5]", "recipe.global.blur_p"),
    ("recipe.local.solarize_p=[0.0,0.1]", "recipe.local.solarize_p"),
])
def test_per_view_list_length_mismatch(override, key):
    msg = _error(overrides=[override])
    assert key in msg
    assert "count" in msg


def test_per_view_list_matching_count_is_accepted():
    cfg = load_config(DINO_R18, ["recipe.local.blur_p=[0.1,0.2,0.3,0.4,0.5,0.6]"])
    assert [v.blur_p for v in cfg.recipe.views() if v.kind == "local"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_dump_and_reload_gives_equal_config(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(cfg))
    assert load_config(out) == cfg


def test_save_config_round_trip_with_overrides(tmp_path):
    cfg = load_config(DINO_R18, ["optim.min_lr=1e-6", "recipe.global.blur_p=0.5",
                                 "train.output_dir=runs/rt", "recipe.local.size=112"])
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.optim.min_lr == 1e-6 and again.recipe.local.size == 112
    # the saved file is self-contained: it holds the recipe, not just a path to it
    assert "recipe:" in out.read_text() and "loss_weights" in out.read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_defaults_round_trip(tmp_path):
    cfg = load_config(None, ["data.recipe="])
    out = tmp_path / "d.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_overriding_the_recipe_of_a_saved_config_reloads_it(tmp_path):
    from sslight_dali.config import save_config
    from sslight_dali.run_config import load_config
    saved = tmp_path / "config.yaml"
    save_config(load_config("configs/dino/resnet18_sslight.yaml"), saved)
    cfg = load_config(saved, ["data.recipe=pipelines/cnn_baseline.yaml"])
    assert cfg.recipe.name == "cnn_baseline" and cfg.recipe.local.size == 96


def test_swav_crops_for_assign_must_name_global_views():
    import pytest
    from sslight_dali.config import ConfigError
    from sslight_dali.run_config import load_config
    with pytest.raises(ConfigError, match="swav.crops_for_assign"):
        load_config("configs/swav/mobilenetv2_sslight.yaml", ["swav.crops_for_assign=[0,5]"])


# ------------------------------------------------------------------------------------------ methods' sections
def test_a_config_holding_every_methods_section_loads_as_its_method(tmp_path):
    # Every method's section is a valid key in any config (a checkpoint may hold dino, swav and moco):
    # each other method's section is checked against its dataclass, then dropped.
    import dataclasses

    import yaml

    from sslight_dali.config import FIXED_FIELDS, to_dict
    from sslight_dali.methods.dino import DinoCfg
    from sslight_dali.methods.moco import MocoCfg
    from sslight_dali.methods.swav import SwavConfig
    from sslight_dali.run_config import config_from_dict

    swav = load_config("configs/swav/resnet18_sslight.yaml")
    full = {**to_dict(swav), "dino": to_dict(DinoCfg()), "moco": {"temperature": 0.3}}
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump(full, sort_keys=False))
    cfg = load_config(p)
    assert type(cfg) is SwavConfig and cfg == swav == config_from_dict(full)
    shown = dump_config(cfg)
    assert shown == dump_config(swav) and "\ndino:" not in shown and "\nmoco:" not in shown
    with pytest.raises(ConfigError, match=r"old.yaml: dino\.out_dim: 0 is out of range"):
        p.write_text(yaml.safe_dump({**full, "dino": {"out_dim": 0}}))
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'moco\.temprature' \(did you mean 'temperature'\?\)"):
        config_from_dict({**full, "moco": {"temprature": 0.3}})
    assert "out of range" in _error(overrides=["method=swav", "moco.temperature=0"])  # an override, too
    # The base class is the same class it was declared as: no section added to it, none invented.
    assert tuple(f.name for f in dataclasses.fields(Config)) == FIXED_FIELDS
    assert FIXED_FIELDS == ("method", "model", "optim", "train", "data", "eval", "recipe")
    assert not hasattr(Config(), "dino") and not hasattr(Config, "__getattr__")
