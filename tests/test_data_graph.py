"""The DINO-SSLight DALI graph, counted from the built pipeline's serialized definition."""
from collections import Counter

from sslight_dali.config import load_config
from sslight_dali.data.dali_views import ReaderSpec, train_pipeline

CONFIG = "configs/dino/resnet18_sslight.yaml"
# Operator instances in the graph before the view chain was rewritten: 328 (fixed jitter order,
# debug off), of which 63 conditional splits and 24 merges. Measured with op_names() below on the
# dali_views.py of commit 3258304 (per view: crop, then brightness, contrast, hsv, grayscale, blur,
# solarize each behind a per-sample conditional).
OLD_GRAPH_OPS = 328


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        b = buf[i]
        i += 1
        x |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return x, i


def _fields(buf: bytes):
    """(field number, value) of one protobuf message, wire types 0, 1, 2 and 5."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        yield field, value


def op_names(pipe) -> list[str]:
    """Operator schema names, one per instance: DALI's PipelineDef keeps its operators in field 5
    (OpDef), whose field 1 is the schema name."""
    return [dict(_fields(op))[1].decode() for field, op in _fields(pipe.serialize()) if field == 5]


def _pipe(*overrides, debug=False):
    cfg = load_config(CONFIG, list(overrides))
    return train_pipeline(ReaderSpec(files=["unused.jpg"], indices=[0]), cfg.recipe, "cpu", True, 0.0, debug,
                          batch_size=2, num_threads=1, device_id=None)


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
