"""Every reference number of the 20 seed configs, one assertion per number.

The expected values below are an independent transcription of the reference code (saic-fi/SSLight:
src/config/defaults.py, the experiment YAMLs src/config/exp_yamls/<method>/*.yaml and the scripts
src/experiments/<method>/<arch>/*.sh). They are NOT read from configs/ or pipelines/. The ResNet18/34 rows
for SwAV and MoCo are this project's additions: same recipe and hyper-parameters as the MNv2 row of
that method (as the reference does for DINO, where the CNN YAMLs are shared across backbones).

Each test id names the config and the key, e.g. `dino/mobilenetv2_baseline::recipe.local.size`.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from sslight_dali.config import to_dict
from sslight_dali.run_config import load_config

REPO = Path(__file__).resolve().parent.parent

METHOD_BACKBONES = {
    "dino": ["mobilenetv2", "resnet18", "resnet34", "vit_tiny"],
    "swav": ["mobilenetv2", "resnet18", "resnet34"],
    "moco": ["mobilenetv2", "resnet18", "resnet34"],
}
VARIANTS = ["baseline", "sslight"]
RUNS = [(m, b, v) for m, bs in METHOD_BACKBONES.items() for b in bs for v in VARIANTS]

TIMM_NAME = {"mobilenetv2": "mobilenetv2_100", "resnet18": "resnet18", "resnet34": "resnet34",
             "vit_tiny": "vit_tiny_patch16_224"}

# Reference world size: 8 GPUs x TRAIN.BATCH_SIZE 128 = global batch 1024 (src/main.py:26-40 spawns
# NUM_GPUS_PER_NODE = 8 processes).
REFERENCE_GPUS = 8

# ---------------------------------------------------------------------------------------------
# View sampling (MULTI_VIEWS_TRANSFORMS of the exp_yamls): (global scale, local scale, #local, local size, LAMBDAS)
# ---------------------------------------------------------------------------------------------
VIEWS = {
    ("cnn", "baseline"): dict(g_scale=(0.14, 1.0), l_scale=(0.05, 0.14), n_local=6, l_size=96,
                              lambdas=(0.142857, 0.857143)),
    ("cnn", "sslight"): dict(g_scale=(0.3, 1.0), l_scale=(0.05, 0.3), n_local=6, l_size=128,
                             lambdas=(0.4, 0.6)),
    ("vit", "baseline"): dict(g_scale=(0.25, 1.0), l_scale=(0.05, 0.25), n_local=10, l_size=96,
                              lambdas=(0.090909, 0.909091)),
    ("vit", "sslight"): dict(g_scale=(0.3, 1.0), l_scale=(0.05, 0.3), n_local=10, l_size=128,
                             lambdas=(0.4, 0.6)),
}
GLOBAL_COUNT, GLOBAL_SIZE = 2, 224

# Photometric settings per method (same for baseline and SSLight; src/data/transforms.py:45-80).
PHOTO_DINO_MOCO = dict(flip_p=0.5, jitter_p=0.8, jitter=(0.4, 0.4, 0.2, 0.1), grayscale_p=0.2,
                       blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2), solarize_threshold=128)
PHOTO_SWAV = dict(flip_p=0.5, jitter_p=0.8, jitter=(0.8, 0.8, 0.8, 0.2), grayscale_p=0.2,
                  blur_p=(0.5, 0.5, 0.5), solarize_p=(0.0, 0.0), solarize_threshold=None)
BLUR_SIGMA = (0.1, 2.0)
RATIO = (3 / 4, 4 / 3)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------
# Optimisation and schedule (SOLVER.* of the exp_yamls)
# ---------------------------------------------------------------------------------------------
OPTIM = {
    "dino_cnn": dict(name="lars", base_lr=0.48, peak_lr=1.92, min_lr=0.0048, warmup_epochs=10,
                     start_warmup_lr=0.0, weight_decay=1e-6, weight_decay_end=1e-6,
                     momentum=0.9, lars_eta=0.001, clip_grad=0.0),
    "dino_vit": dict(name="adamw", base_lr=0.0005, peak_lr=0.002, min_lr=1e-5, warmup_epochs=10,
                     start_warmup_lr=0.0, weight_decay=0.04, weight_decay_end=0.4,
                     betas=(0.9, 0.999), eps=1e-8, clip_grad=0.0),
    "swav": dict(name="lars", base_lr=0.3, peak_lr=1.2, min_lr=0.0048, warmup_epochs=10,
                 start_warmup_lr=0.075, weight_decay=1e-6, weight_decay_end=1e-6,
                 momentum=0.9, lars_eta=0.001, clip_grad=0.0),
    "moco": dict(name="lars", base_lr=0.48, peak_lr=1.92, min_lr=0.0048, warmup_epochs=10,
                 start_warmup_lr=0.0, weight_decay=1e-6, weight_decay_end=1e-6,
                 momentum=0.9, lars_eta=0.001, clip_grad=0.0),
}
EPOCHS, BATCH_PER_GPU = 200, 128

# ---------------------------------------------------------------------------------------------
# Heads and method hyper-parameters (DINO.*, SWAV.*, MOCO.* of defaults.py and the exp_yamls)
# ---------------------------------------------------------------------------------------------
DINO_COMMON = dict(hidden_dim=2048, bottleneck_dim=256, num_layers=3, student_temp=0.1,
                   warmup_teacher_temp=0.04, teacher_temp=0.07, center_momentum=0.9,
                   freeze_last_layer_epochs=1, momentum_teacher=0.996, momentum_teacher_end=1.0)
DINO_CNN = dict(out_dim=4096, use_bn_in_head=True, norm_last_layer=True, warmup_teacher_temp_epochs=50)
DINO_VIT = dict(out_dim=65536, use_bn_in_head=False, norm_last_layer=False, warmup_teacher_temp_epochs=30)
SWAV = dict(num_prototypes=3000, out_dim=128, hidden_dim=4096, num_layers=2, use_bn_in_head=True,
            temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, queue_length=3840,
            epoch_queue_starts=15, freeze_prototypes_epochs=1, crops_for_assign=(0, 1))
MOCO = dict(temperature=0.2, queue_length=65536, momentum=0.999, out_dim=128, hidden_dim=2048,
            num_layers=2, use_bn_in_head=False)
VIT_DROP_PATH = 0.1  # student only


def _family(method: str, backbone: str) -> str:
    return "vit" if backbone.startswith("vit") else "cnn"


def _optim_key(method: str, backbone: str) -> str:
    if method == "dino":
        return f"dino_{_family(method, backbone)}"
    return method


def expected_numbers(method: str, backbone: str, variant: str) -> list[tuple[str, object]]:
    """(key, expected) pairs for one run; lists are split so each number is its own entry."""
    fam = _family(method, backbone)
    v = VIEWS[(fam, variant)]
    photo = PHOTO_SWAV if method == "swav" else PHOTO_DINO_MOCO
    out: list[tuple[str, object]] = [
        ("method", method),
        ("model.backbone", TIMM_NAME[backbone]),
        ("model.drop_path_rate", VIT_DROP_PATH if fam == "vit" else 0.0),
        # crops
        ("recipe.global.count", GLOBAL_COUNT),
        ("recipe.global.size", GLOBAL_SIZE),
        ("recipe.global.scale[0]", v["g_scale"][0]),
        ("recipe.global.scale[1]", v["g_scale"][1]),
        ("recipe.local.count", v["n_local"]),
        ("recipe.local.size", v["l_size"]),
        ("recipe.local.scale[0]", v["l_scale"][0]),
        ("recipe.local.scale[1]", v["l_scale"][1]),
        ("recipe.loss_weights[0]", v["lambdas"][0]),
        ("recipe.loss_weights[1]", v["lambdas"][1]),
        ("recipe.augment.ratio[0]", RATIO[0]),
        ("recipe.augment.ratio[1]", RATIO[1]),
        ("recipe.augment.interpolation", "bicubic"),
        # photometric
        ("recipe.augment.flip_p", photo["flip_p"]),
        ("recipe.augment.jitter_p", photo["jitter_p"]),
        ("recipe.augment.brightness", photo["jitter"][0]),
        ("recipe.augment.contrast", photo["jitter"][1]),
        ("recipe.augment.saturation", photo["jitter"][2]),
        ("recipe.augment.hue", photo["jitter"][3]),
        ("recipe.augment.grayscale_p", photo["grayscale_p"]),
        ("recipe.augment.blur_sigma[0]", BLUR_SIGMA[0]),
        ("recipe.augment.blur_sigma[1]", BLUR_SIGMA[1]),
    ]
    if photo["solarize_threshold"] is not None:
        out.append(("recipe.augment.solarize_threshold", photo["solarize_threshold"]))
    for i in range(3):
        out.append((f"recipe.augment.mean[{i}]", MEAN[i]))
        out.append((f"recipe.augment.std[{i}]", STD[i]))
    # Per-view blur / solarize, resolved through Recipe.views() (order g1, g2, l1..lN).
    out += [("view:global1.blur_p", photo["blur_p"][0]), ("view:global2.blur_p", photo["blur_p"][1]),
            ("view:global1.solarize_p", photo["solarize_p"][0]),
            ("view:global2.solarize_p", photo["solarize_p"][1])]
    for i in range(1, v["n_local"] + 1):
        out.append((f"view:local{i}.blur_p", photo["blur_p"][2]))
        out.append((f"view:local{i}.solarize_p", 0.0))  # solarize is for global 2 only
    # optimisation
    for k, val in OPTIM[_optim_key(method, backbone)].items():
        if k == "peak_lr":
            continue  # checked as a derived fact below
        if isinstance(val, tuple):
            out += [(f"optim.{k}[{i}]", x) for i, x in enumerate(val)]
        else:
            out.append((f"optim.{k}", val))
    out += [("train.epochs", EPOCHS), ("train.batch_size", BATCH_PER_GPU),
            ("train.joint_linear_probe", True)]
    # heads
    if method == "dino":
        for k, val in {**DINO_COMMON, **(DINO_VIT if fam == "vit" else DINO_CNN)}.items():
            out.append((f"dino.{k}", val))
    elif method == "swav":
        for k, val in SWAV.items():
            if isinstance(val, tuple):
                out += [(f"swav.{k}[{i}]", x) for i, x in enumerate(val)]
            else:
                out.append((f"swav.{k}", val))
        out.append(("swav.crops_for_assign.len", 2))
    else:
        for k, val in MOCO.items():
            out.append((f"moco.{k}", val))
    return out


def config_path(method, backbone, variant) -> Path:
    return REPO / "configs" / method / f"{backbone}_{variant}.yaml"


@functools.lru_cache(maxsize=None)
def load(method, backbone, variant):
    return load_config(config_path(method, backbone, variant))


def lookup(cfg, key: str):
    """Resolve `a.b[i]`, `a.b.len` or `view:<name>.<attr>` on a loaded Config."""
    if key.startswith("view:"):
        name, attr = key[len("view:"):].split(".")
        views = {v.name: v for v in cfg.recipe.views()}
        assert name in views, f"view {name} not produced; views are {list(views)}"
        return getattr(views[name], attr)
    obj = cfg
    for part in key.split("."):
        if part == "len":
            return len(obj)
        m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part)
        name, idx = m.group(1), m.group(2)
        obj = getattr(obj, "global_" if name == "global" else name)
        if idx is not None:
            assert len(obj) > int(idx), f"{key}: list {obj} too short"
            obj = obj[int(idx)]
    return obj


def _run_id(run) -> str:
    m, b, v = run
    return f"{m}/{b}_{v}"


CASES = [pytest.param(run, key, exp, id=f"{_run_id(run)}::{key}")
         for run in RUNS for key, exp in expected_numbers(*run)]


def test_every_seed_config_is_covered():
    on_disk = sorted(str(p.relative_to(REPO / "configs"))
                     for p in (REPO / "configs").glob("*/*.yaml"))
    expected = sorted(f"{m}/{b}_{v}.yaml" for m, b, v in RUNS)
    assert on_disk == expected
    assert len(expected) == 20


@pytest.mark.parametrize("run,key,expected", CASES)
def test_reference_number(run, key, expected):
    got = lookup(load(*run), key)
    if isinstance(expected, bool) or isinstance(expected, str):
        assert got == expected, f"{_run_id(run)}: {key} = {got!r}, reference {expected!r}"
        assert type(got) is type(expected)
    elif isinstance(expected, int) and not isinstance(got, float):
        assert got == expected and not isinstance(got, bool), \
            f"{_run_id(run)}: {key} = {got!r}, reference {expected!r}"
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), \
            f"{_run_id(run)}: {key} = {got!r}, reference {expected!r}"


# ---------------------------------------------------------------------------------------------
# Derived facts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", RUNS, ids=_run_id)
def test_peak_lr(run):
    """Peak LR = BASE_LR x global batch / 256 with the reference's 8 x 128 = 1024 (src/sslight/engine/trainer.py:90)."""
    cfg = load(*run)
    global_batch = cfg.train.batch_size * REFERENCE_GPUS
    assert global_batch == 1024
    peak = cfg.optim.base_lr * global_batch / 256
    assert peak == pytest.approx(OPTIM[_optim_key(run[0], run[1])]["peak_lr"], rel=1e-9)


@pytest.mark.parametrize("run", [r for r in RUNS if r[2] == "baseline"], ids=_run_id)
def test_baseline_lambdas_reproduce_uniform_pair_mean(run):
    """Baseline LAMBDAS = 2/(2+2N), 2N/(2+2N) for N locals: the uniform mean over all 2+2N pairs."""
    cfg = load(*run)
    n = cfg.recipe.local.count
    gg, gl = cfg.recipe.loss_weights
    assert gg == pytest.approx(2 / (2 + 2 * n), abs=1e-5)
    assert gl == pytest.approx(2 * n / (2 + 2 * n), abs=1e-5)


@pytest.mark.parametrize("run", [r for r in RUNS if r[2] == "sslight"], ids=_run_id)
def test_sslight_pair_weights(run):
    """SSLight LAMBDAS [0.4, 0.6] give each gg pair 0.2 and each gl pair 0.6/(2N) (0.05 CNN, 0.03 ViT)."""
    cfg = load(*run)
    n = cfg.recipe.local.count
    gg, gl = cfg.recipe.loss_weights
    assert gg / 2 == pytest.approx(0.2)
    assert gl / (2 * n) == pytest.approx(0.03 if run[1].startswith("vit") else 0.05)


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        out[f"{prefix[:-1]}.len"] = len(d)
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix[:-1]}[{i}]."))
    else:
        out[prefix[:-1]] = d
    return out


IDENTIFIERS = {"recipe.name", "train.output_dir", "data.recipe"}
# The reference's baseline -> sslight YAML diff: min global scale, max local scale, local size, both
# LAMBDAS; nothing else.
SSLIGHT_DIFF = {"recipe.global.scale[0]", "recipe.local.scale[1]", "recipe.local.size",
                "recipe.loss_weights[0]", "recipe.loss_weights[1]"}


@pytest.mark.parametrize("pair", [(m, b) for m, bs in METHOD_BACKBONES.items() for b in bs],
                         ids=lambda p: f"{p[0]}/{p[1]}")
def test_sslight_differs_from_baseline_only_in_view_sampling(pair):
    base = _flatten(to_dict(load(*pair, "baseline")))
    ssl = _flatten(to_dict(load(*pair, "sslight")))
    assert base.keys() == ssl.keys()
    differ = {k for k in base if base[k] != ssl[k]}
    assert differ - IDENTIFIERS == SSLIGHT_DIFF
    assert differ & IDENTIFIERS == {"recipe.name", "train.output_dir", "data.recipe"}


@pytest.mark.parametrize("run", [r for r in RUNS if r[1] in ("resnet18", "resnet34")], ids=_run_id)
def test_resnet_configs_match_mobilenetv2_row(run):
    """R18/R34 use the same recipe and hyper-parameters as the MNv2 row of that method."""
    m, b, v = run
    mine = _flatten(to_dict(load(m, b, v)))
    mnv2 = _flatten(to_dict(load(m, "mobilenetv2", v)))
    differ = {k for k in mine if mine[k] != mnv2.get(k)}
    assert differ == {"model.backbone", "train.output_dir"}
