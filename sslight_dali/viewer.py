"""Contact sheet of the views a recipe produces from one image (`sslight views CONFIG --image PATH`).

One row per sample; globals and locals at their real relative sizes, each labelled with its name and
the ops the DALI graph applied (from the builder's debug records).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .augment import ops_label

PAD, LABEL_H = 6, 24


def _ops_label(name: str, r: dict) -> str:
    return f"{name}\n{ops_label(r)}"


def sample_views(cfg, image_path: str | Path, samples: int = 4, seed: int | None = None):
    """[(view names, [HWC uint8 per view], [record dict per view])] for `samples` draws (DALI on the CPU)."""
    # optional: DALI (and `sslight views --help` loads no torch)
    import torch

    from .run_config import load_config  # light: loading a config by its method imports the methods (torch)

    from .data.dali_views import record_dict
    from .data.loader import DaliTrainLoader
    from .data.sources import Samples, verify_samples
    data = verify_samples(Samples([str(image_path)] * samples, [0] * samples, ["image"]))
    loader = DaliTrainLoader(data, cfg.recipe, debug=True, batch_size=samples, device="cpu", rank=0, world_size=1,
                             channels_last=False, dtype=torch.float32, num_threads=1, prefetch=1,
                             seed=cfg.train.seed if seed is None else seed, hw_decoder_load=0.0)
    views, _, _, records = next(loader.epoch(0))
    aug = cfg.recipe.augment
    mean, std = np.array(aug.mean)[:, None, None], np.array(aug.std)[:, None, None]
    rows = []
    for b in range(samples):
        imgs = [np.clip((v[b].numpy() * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
                for v in views]
        rows.append((loader.view_names, imgs, [record_dict(r[b].numpy()) for r in records]))
    return rows


def render_views(cfg, image_path: str | Path, samples: int = 4, out: str | Path = "views.png") -> Path:
    rows = sample_views(cfg, image_path, samples)
    sizes = [im.shape[0] for im in rows[0][1]]
    row_h = max(sizes) + LABEL_H + PAD
    width = sum(s + PAD for s in sizes) + PAD
    sheet = Image.new("RGB", (width, row_h * len(rows) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (names, imgs, recs) in enumerate(rows):
        x, y = PAD, PAD + r * row_h
        for name, im, rec in zip(names, imgs, recs):
            sheet.paste(Image.fromarray(im), (x, y))
            draw.multiline_text((x, y + im.shape[0] + 1), _ops_label(name, rec), fill="black", spacing=0)
            x += im.shape[1] + PAD
    out = Path(out)
    sheet.save(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML (its recipe is rendered)")
    parser.add_argument("--image", required=True, help="image file to sample views from")
    parser.add_argument("--samples", type=int, default=4, help="rows: independent draws of all views")
    parser.add_argument("--out", default="views.png", help="output PNG")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if not Path(args.image).is_file():
        print(f"sslight views: image not found: {args.image}", file=sys.stderr)
        return 2
    out = render_views(cfg, args.image, args.samples, args.out)
    print(f"wrote {out}")
    return 0
