"""The DALI graphs, read from the pipelines' serialized definitions: operator counts, and the GPU graph's
placement checked without a GPU."""
from collections import Counter
from pathlib import Path

import pytest

from sslight_dali.run_config import load_config
from sslight_dali.data.dali_views import ReaderSpec, eval_pipeline, train_pipeline

from helpers import CONFIG, graph, op_names, train_pipe as _pipe

# Operator instances in the graph before the view chain was rewritten: 328 (fixed jitter order,
# debug off), of which 63 conditional splits and 24 merges. Measured with helpers.op_names() on the
# dali_views.py of commit 3258304 (per view: crop, then brightness, contrast, hsv, grayscale, blur,
# solarize each behind a per-sample conditional).
OLD_GRAPH_OPS = 328


def test_graph_has_at_most_half_the_operators():
    names = op_names(_pipe())
    counts = Counter(names)
    # The parser reads the real graph: one reader, one decoder, a crop resize and a normalize per view.
    assert counts["readers__File"] == 1 and counts["decoders__Image"] == 1
    assert counts["Resize"] == counts["CropMirrorNormalize"] == 8
    assert len(names) <= OLD_GRAPH_OPS // 2, (len(names), counts.most_common())
    # Colour jitter and grayscale run for the whole group without conditionals: the only per-sample
    # conditionals left are the blurs with 0 < p < 1 (global 2 and the 6 locals) and, on the CPU, the
    # solarize of global 2: one merge each.
    assert counts["_conditional__Merge"] == 8, counts
    # One stack and one colour pass per group of same-size views, and one operator to split it again.
    assert counts["Hsv"] == counts["Stack"] == counts["ElementExtract"] == 2
    assert counts["_TensorSubscript"] == 0, counts


def test_random_order_keeps_its_per_sample_slots():
    # The random jitter order is the slow, exact path: per-view chains with per-slot conditionals.
    counts = Counter(op_names(_pipe("recipe.augment.jitter_order=random")))
    assert counts["LookupTable"] == 8 * 4 and counts["Stack"] == 0


def test_views_are_what_their_records_say(make_cfg):
    # End to end through the sequence graph: each view re-made from its debug record with PIL and
    # torchvision (crop window, bicubic resize, jitter factors if jittered, grayscale if gray) matches
    # the view, and matches it better than with another view's record. Hue, blur, solarize and flip
    # off, so every remaining op has an exact PIL counterpart.
    import numpy as np
    import torchvision.transforms.functional as F
    from PIL import Image

    from sslight_dali.data import build_train_loader, list_samples
    from sslight_dali.data.dali_views import record_dict
    from sslight_dali.data.torch_views import load_rgb
    cfg = make_cfg("recipe.augment.hue=0", "recipe.augment.flip_p=0", "recipe.global.blur_p=[0.0,0.0]",
                   "recipe.local.blur_p=[0.0]", "recipe.global.solarize_p=[0.0,0.0]", "recipe.augment.jitter_p=0.5",
                   "recipe.augment.grayscale_p=0.3")
    aug = cfg.recipe.augment
    loader = build_train_loader(cfg, debug=True)
    views, _, index, records = next(iter(loader.epoch(0)))
    samples = list_samples(cfg.data.root, "train")

    def remake(img, rec, size):
        y, x, h, w = (int(rec[k]) for k in ("crop_y", "crop_x", "crop_h", "crop_w"))
        out = img.crop((x, y, x + w, y + h)).resize((size, size), Image.BICUBIC)
        if rec["jitter"]:
            out = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(out, rec["brightness"]), rec["contrast"]),
                                      rec["saturation"])
        if rec["gray"]:
            out = F.rgb_to_grayscale(out, num_output_channels=3)
        return np.asarray(out, np.float32)

    mean, std = np.array(aug.mean) * 255, np.array(aug.std) * 255
    flags = set()
    for b in range(len(index)):
        img = load_rgb(samples, int(index[b]))
        recs = [record_dict(r[b].numpy()) for r in records]
        for v, view in enumerate(views):
            got = view[b].float().numpy().transpose(1, 2, 0) * std + mean
            errs = [np.abs(got - remake(img, r, got.shape[0])).mean() for r in recs if r["crop_h"] > 0]
            assert errs[v] < 2.0 and errs[v] == min(errs), (b, v, recs[v], errs)
            flags.add((recs[v]["jitter"], recs[v]["gray"]))
    assert flags == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}  # every combination was checked


# --- the GPU graph, checked without a GPU ------------------------------------------------------------
# DALI defines and serializes a graph with GPU operators on a machine without CUDA (device_id=None);
# only building it needs the GPU. Defining it already applies DALI's data-flow rules (GPU data only
# into regular inputs of GPU operators: serialize() raises otherwise, naming the operator); what it
# does not check until the build is that each operator has an implementation for its device. So
# every recipe's GPU graph is checked here, before a GPU ever runs it.
RECIPES = sorted(p.stem for p in (Path(__file__).parents[2] / "pipelines").glob("*.yaml"))
assert len(RECIPES) == 6, RECIPES


def unplaceable(ops) -> list[str]:
    """Operators placed on a device DALI has no implementation for."""
    from nvidia.dali import backend
    registered = {"cpu": set(backend.RegisteredCPUOps()), "gpu": set(backend.RegisteredGPUOps()),
                  "mixed": set(backend.RegisteredMixedOps())}
    return [f"{name} ({device})" for name, device, _, _ in ops if name not in registered[device]]


def _image_ops(ops) -> Counter:
    """The named pixel operators (fed, through any chain, by the decoder), by name and device. Not
    brightness_contrast: on the GPU the contrast blend is arithmetic (its centre, the mean luma, is
    GPU data and cannot be an argument input)."""
    named = {"decoders__Image", "Resize", "Hsv", "GaussianBlur", "CropMirrorNormalize", "Stack", "ElementExtract",
             "reductions__Mean", "Brightness", "Saturation", "Hue"}
    pixels, found = set(), Counter()
    for name, device, inputs, outputs in ops:  # serialized in topological order
        if name == "decoders__Image" or any(inp in pixels for inp, _, arg in inputs if not arg):
            pixels.update(out for out, _, _ in outputs)
            found[name, device] += name in named
    return +found


@pytest.mark.parametrize("order", ["fixed", "random"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_graph_is_placeable(recipe, order):
    overrides = (f"data.recipe={recipe}", f"recipe.augment.jitter_order={order}")
    # Debug records too for the default (fixed) order; the random order's graph takes ~2 s to define.
    for debug in (False, True) if order == "fixed" else (False,):
        ops, outputs = graph(_pipe(*overrides, debug=debug, device="gpu"))
        assert unplaceable(ops) == [], (recipe, order, debug)
        n_views = len(load_config(CONFIG, list(overrides)).recipe.views())
        assert [dev for _, dev, _ in outputs[:n_views]] == ["gpu"] * n_views
        # The GPU graph does the CPU graph's pixel work, every op of it on the GPU after a mixed decoder.
        cpu_ops = _image_ops(graph(_pipe(*overrides, debug=debug))[0])
        expected = Counter({(name, "mixed" if name == "decoders__Image" else "gpu"): n
                            for (name, _), n in cpu_ops.items()})
        assert _image_ops(ops) == expected


READERS = {"files": ReaderSpec(files=["unused.jpg"], indices=[0]),
           "webdataset": ReaderSpec(files=["unused.tar"], indices=[], storage="tar", index_files=["unused.idx"],
                                 source_info_len=32)}


@pytest.mark.parametrize("reader", READERS)
def test_gpu_eval_graph_and_readers_are_placeable(reader):
    pipe = eval_pipeline(READERS[reader], 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "gpu", True, 0.65,
                         batch_size=2, num_threads=1, device_id=None)
    ops, outputs = graph(pipe)
    assert unplaceable(ops) == []
    assert _image_ops(ops) == Counter({("decoders__Image", "mixed"): 1, ("Resize", "gpu"): 1,
                                       ("CropMirrorNormalize", "gpu"): 1})
    assert [dev for _, dev, _ in outputs] == ["gpu", "cpu"]
    train = train_pipeline(READERS[reader], load_config(CONFIG).recipe, "gpu", True, 0.65,
                           batch_size=2, num_threads=1, device_id=None)
    ops, outputs = graph(train)
    assert unplaceable(ops) == [] and [dev for _, dev, _ in outputs] == ["gpu"] * 8 + ["cpu"]


def test_unplaceable_finds_an_operator_without_a_gpu_implementation():
    # Defined and serialized without complaint; the build on a GPU would refuse it.
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def shapes_on_the_gpu():
        jpegs, _ = fn.readers.file(files=["unused.jpg"])
        return fn.peek_image_shape(jpegs.gpu(), device="gpu")

    assert unplaceable(graph(shapes_on_the_gpu())[0]) == ["PeekImageShape (gpu)"]
