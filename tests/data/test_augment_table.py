"""The augmentation-op table (sslight_dali/augment.py) is the one home of each op: its recipe knobs,
both backends' implementations, its debug-record fields, its ablation. The last test adds an op
(invert) to a copy of augment.py as README says, and sees it in the config, both backends, the
viewer's caption and bench's ablations."""
from __future__ import annotations

import dataclasses
import textwrap
from collections import Counter

import pytest

from sslight_dali.augment import FRAME_FIELDS, OPS, OpKnobs, ViewOpKnobs, ops_label, record_fields
from sslight_dali.bench.sweeps import ABLATIONS, op_in_recipe
from sslight_dali.config import Augment, GlobalViews, LocalViews, ViewGroup, ViewSpec
from sslight_dali.run_config import load_config

from helpers import op_names, train_pipe as _pipe

CONFIG = "configs/dino/resnet18_sslight.yaml"


def test_every_knob_belongs_to_exactly_one_op():
    # The crop's and normalize's fields are the view's frame; every other field is one op's knob.
    frame = {"ratio", "interpolation", "mean", "std", "count", "size", "scale"}
    owners = Counter(name for op in OPS for name in op.knob_names())
    fields = [f.name for cls in (Augment, ViewGroup) for f in dataclasses.fields(cls)]
    assert sorted(set(fields) - frame) == sorted(owners) and max(owners.values()) == 1
    assert len(set(record_fields())) == len(record_fields()) and set(FRAME_FIELDS) <= set(record_fields())


def test_the_table_and_the_declared_fields_agree():
    # Each op's knob classes are bases of the recipe's classes (so their fields are in every config,
    # with the declared defaults), in table order; its probability is one of its knobs; every per-view
    # list has its value per view in ViewSpec, and a default in each kind.
    assert [op.knobs for op in OPS] == [c for c in reversed(OpKnobs.__bases__)]
    assert [op.view_knobs for op in OPS if op.view_knobs] == [c for c in reversed(ViewOpKnobs.__bases__)]
    assert issubclass(Augment, OpKnobs) and issubclass(ViewGroup, ViewOpKnobs)
    assert [f.name for f in dataclasses.fields(Augment)] == \
        ["ratio", "interpolation", *[n for op in OPS for n in op.knob_names() if n in Augment.__dataclass_fields__],
         "mean", "std"]
    for op in OPS:
        assert op.prob in op.knob_names(), op.name
    per_view = [f.name for f in dataclasses.fields(ViewOpKnobs)]
    spec = [f.name for f in dataclasses.fields(ViewSpec)]
    assert spec == ["kind", "index", "size", "scale", *per_view]
    for kind in (GlobalViews, LocalViews):
        group = kind()
        assert all(isinstance(getattr(group, n), list) and getattr(group, n) for n in per_view), kind


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_ablation_takes_the_op_out_of_the_graph(op):
    # bench --profile-ops runs the recipe with each op's `off` overrides: the op must be gone from
    # the recipe and from the built DALI graph, and nothing else may change.
    assert ABLATIONS[op.name] == op.off()
    cfg = load_config(CONFIG, op.off())
    assert op_in_recipe(load_config(CONFIG).recipe, op.name) and not op_in_recipe(cfg.recipe, op.name)
    assert all(op_in_recipe(cfg.recipe, o.name) for o in OPS if o is not op)
    full, without = Counter(op_names(_pipe())), Counter(op_names(_pipe(*op.off())))
    assert sum(without.values()) < sum(full.values())
    assert without["Resize"] == full["Resize"] and without["CropMirrorNormalize"] == full["CropMirrorNormalize"]


def test_disable_matches_off():
    for op in OPS:
        recipe = load_config(CONFIG).recipe
        op.disable(recipe)
        assert not op.used(recipe), op.name


def test_both_backends_fill_every_record_field(make_cfg):
    # Every op on for every view: the torchvision backend's record has each op's fields and the
    # frame, and the DALI records (by name, augment.record_fields) report each op applied.
    import torch
    from PIL import Image

    from sslight_dali.augment import record_fields
    from sslight_dali.data import build_train_loader
    from sslight_dali.data.dali_views import record_dict
    from sslight_dali.data.torch_views import ViewTransform

    on = [o for op in OPS for o in (op.off())]
    on = [o.replace("=0", "=1").replace("=[0]", "=[1]") for o in on]
    cfg = make_cfg(*on, "train.batch_size=4")
    view = cfg.recipe.views()[0]
    rec = {}
    ViewTransform(view, cfg.recipe.augment)(Image.new("RGB", (40, 30), (120, 90, 60)), rec)
    assert set(rec) == set(record_fields())
    assert all(rec[k] for op in OPS for k in op.record if k not in ("jitter_perm", "hue_deg"))
    loader = build_train_loader(cfg, channels_last=False, dtype=torch.float32, debug=True)
    _, _, _, records = next(loader.epoch(0))
    for r in records:
        d = record_dict(r[0].numpy())
        assert ops_label(d).split() == [op.label(d) for op in OPS], d


# README, "Where a change goes": a new op is a dataclass of its knobs in augment.py, added to the bases of
# OpKnobs, its torchvision and DALI implementations and one entry in OPS. These are those edits for
# `invert`, applied to a copy of the package by test_a_new_op_is_its_knobs_and_one_table_entry.
INVERT_KNOBS = textwrap.dedent("""
    @dataclass
    class InvertKnobs:
        invert_p: float = setting(0.0, 0.0, 1.0, "invert probability")


    def _invert_torch(img, view, aug, rec):
        from PIL import ImageOps
        rec["invert"] = _rand() < aug.invert_p
        return ImageOps.invert(img) if rec["invert"] else img


    def _invert_dali(img, view, aug):
        dali = _dali()
        coin = dali.coins(aug.invert_p, None)
        if coin is None:
            return img, {"invert": 0.0}
        return dali.dmath.abs(coin * 255.0 - img), {"invert": coin}


""")
INVERT_ENTRY = """    Op("invert", "pixel", InvertKnobs, prob="invert_p", record=("invert",), torch=_invert_torch,
       dali=_invert_dali, label=lambda r: "inv" if r["invert"] else None),
"""


def add_invert(augment_py: str) -> str:
    before_bases = augment_py.index("# The bases in reverse table order")
    src = augment_py[:before_bases] + INVERT_KNOBS.lstrip() + "\n" + augment_py[before_bases:]
    assert src.count("class OpKnobs(") == 1
    src = src.replace("class OpKnobs(", "class OpKnobs(InvertKnobs, ")  # the last op is the first base
    table = src.index("OPS: list[Op] = [")
    end = src.index("\n]\n", table) + 1
    return src[:end] + INVERT_ENTRY + src[end:]


NEW_OP = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from PIL import Image
    import sslight_dali.augment as A
    from sslight_dali.bench.sweeps import ABLATIONS
    from sslight_dali.config import dump_config
    from sslight_dali.run_config import load_config
    from sslight_dali.data import build_train_loader
    from sslight_dali.data.dali_views import record_dict

    def views(backend, p, *extra):
        cfg = load_config("configs/dino/resnet18_sslight.yaml", [
            f"data.root={sys.argv[1]}", "data.device=cpu", "data.num_threads=1",
            f"data.backend={backend}", "train.batch_size=8", "recipe.global.size=32", "recipe.local.size=16",
            f"recipe.augment.invert_p={p}", *[o for op in A.OPS if op.name != "invert" for o in op.off()], *extra])
        loader = build_train_loader(cfg, channels_last=False, dtype=torch.float32, debug=backend == "dali")
        batch = next(loader.epoch(0))
        aug = cfg.recipe.augment
        mean = np.array(aug.mean, np.float32).reshape(3, 1, 1) * 255
        std = np.array(aug.std, np.float32).reshape(3, 1, 1) * 255
        px = [v.numpy() * std + mean for v in batch[0]]
        recs = [[record_dict(r[b].numpy()) for b in range(8)] for r in batch[3]] if backend == "dali" else None
        return cfg, px, recs

    out = {"shown": "invert_p: 0.5" in dump_config(views("dali", 0.5)[0]), "ablation": ABLATIONS.get("invert")}
    for backend in ("dali", "torchvision"):
        _, plain, _ = views(backend, 0.0)
        _, inverted, _ = views(backend, 1.0)
        out[backend] = max(float(np.abs(a + b - 255).max()) for a, b in zip(plain, inverted))
    _, half, recs = views("dali", 0.5)
    out["dali_records"] = sorted({r["invert"] for rv in recs for r in rv})
    out["label"] = A.ops_label(recs[0][0]) if recs[0][0]["invert"] else A.ops_label({**recs[0][0], "invert": 1.0})
    print(json.dumps(out))
""")


def test_a_new_op_is_its_knobs_and_one_table_entry(package_copy, synth_root):
    # `invert`, added to a copy of augment.py as README says (add_invert): its knob is in the config,
    # the DALI and torchvision backends apply it (a view with invert_p=1 is 255 minus the same view with
    # invert_p=0, the same seed and crop), the DALI record reports it per sample, the viewer captions
    # it, bench can ablate it. No other file changes.
    repo, run = package_copy
    augment_py = repo / "sslight_dali" / "augment.py"
    augment_py.write_text(add_invert(augment_py.read_text()))
    (repo / "new_op.py").write_text(NEW_OP)
    res = run("new_op.py", str(synth_root))
    assert res.returncode == 0, res.stderr[-3000:]
    out = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    assert out["shown"] and out["ablation"] == ["recipe.augment.invert_p=0"]
    # float32 normalize and back: within 1e-3 of a grey level
    assert out["dali"] < 1e-3 and out["torchvision"] < 1e-3, out
    assert out["dali_records"] == [0.0, 1.0] and out["label"].split()[-1] == "inv", out
