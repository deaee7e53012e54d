"""A small, deterministic, learnable ImageFolder of JPEGs for the demo, the tests and the benches.

Each class is a shape family (disc, square, triangle, ...). Position, size, rotation, colours,
background texture, image size and aspect vary per image, so a network must learn the shape, not a
colour or a location, to tell the classes apart: exactly the invariance the SSL recipes teach.
"""
from __future__ import annotations

import io
import json
import math
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ["disc", "square", "triangle", "star", "ring", "cross", "stripes", "checker", "hexagon", "crescent",
          "arrow", "dots"]


# `colors=n` draws the foreground and the background from the first n of these. Self-supervised
# methods learn whatever tells two images apart; with any RGB colour, colour alone identifies an image
# and is what a short run learns (useless for the shape classes). A small palette leaves shape, size
# and position as the cues, which is what the demo needs to show in minutes.
PALETTE = [(25, 25, 25), (235, 235, 235), (220, 50, 40), (40, 80, 210), (240, 200, 40), (40, 160, 70),
           (150, 60, 180), (40, 190, 200)]


def _colour(rng: np.random.Generator, colors: int) -> tuple[int, int, int]:
    if colors:
        return PALETTE[int(rng.integers(colors))]
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _polygon(cx, cy, r, n, rot, star=False):
    pts = []
    steps = 2 * n if star else n
    for k in range(steps):
        rad = r if (not star or k % 2 == 0) else r * 0.45
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rot, fg, bg, rng):
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=fg)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=fg)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, star=True), fill=fg)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    elif shape == "cross":
        w = r * 0.3
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                          (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fg)
    elif shape == "stripes":
        for k in range(-3, 4):
            off = k * r * 0.3
            dx, dy = math.cos(rot), math.sin(rot)
            px, py = -dy, dx
            x0, y0 = cx + px * off, cy + py * off
            draw.line([(x0 - dx * r, y0 - dy * r), (x0 + dx * r, y0 + dy * r)], fill=fg, width=max(2, int(r * 0.12)))
    elif shape == "checker":
        n = 4
        s = 2 * r / n
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    draw.rectangle([cx - r + i * s, cy - r + j * s, cx - r + (i + 1) * s, cy - r + (j + 1) * s], fill=fg)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fg)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ox, oy = r * 0.45 * math.cos(rot), r * 0.45 * math.sin(rot)
        draw.ellipse([cx - r + ox, cy - r + oy, cx + r + ox, cy + r + oy], fill=bg)
    elif shape == "arrow":
        dx, dy = math.cos(rot), math.sin(rot)
        px, py = -dy, dx
        head = [(cx + dx * r, cy + dy * r), (cx + px * r * 0.6, cy + py * r * 0.6), (cx - px * r * 0.6, cy - py * r * 0.6)]
        draw.polygon(head, fill=fg)
        w = r * 0.2
        draw.polygon([(cx + px * w, cy + py * w), (cx - dx * r + px * w, cy - dy * r + py * w),
                      (cx - dx * r - px * w, cy - dy * r - py * w), (cx - px * w, cy - py * w)], fill=fg)
    elif shape == "dots":
        for _ in range(7):
            a, d = rng.uniform(0, 2 * math.pi), rng.uniform(0, r * 0.8)
            q = r * 0.2
            x, y = cx + d * math.cos(a), cy + d * math.sin(a)
            draw.ellipse([x - q, y - q, x + q, y + q], fill=fg)
    else:
        raise ValueError(f"unknown shape {shape}")


def make_image(shape: str, rng: np.random.Generator, min_side: int, max_side: int, clutter: float = 1.0,
               colors: int = 0) -> Image.Image:
    """One image of `shape`; `clutter` scales the background texture (0: a flat background);
    `colors` > 0 draws both colours from the first `colors` of PALETTE (0: any RGB colour)."""
    w = int(rng.integers(min_side, max_side + 1))
    aspect = float(np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))))
    h = int(np.clip(round(w / aspect), min_side, max_side))
    bg = _colour(rng, colors)
    fg = _colour(rng, colors)
    while sum(abs(a - b) for a, b in zip(fg, bg)) < 200:  # keep the shape visible
        fg = _colour(rng, colors)
    # Textured background: low-frequency colour noise plus fine grain, like a photo's clutter.
    coarse = rng.normal(0, 40 * clutter, (max(2, h // 24), max(2, w // 24), 3))
    noise = np.asarray(Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255))).resize((w, h), Image.BICUBIC),
                       dtype=np.float32) - 128
    grain = rng.normal(0, 10 * clutter, (h, w, 3))
    base = np.clip(np.asarray(bg, np.float32) + noise + grain, 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.42) * min(w, h)
    cx = rng.uniform(r, w - r)
    cy = rng.uniform(r, h - r)
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), fg, bg, rng)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.8))))


def _write_class(job) -> list[int]:
    out, split, split_seed, c, shape, n, seed, min_side, max_side, quality, clutter, colors = job
    d = Path(out) / split / f"{c:02d}_{shape}"
    d.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(n):
        rng = np.random.default_rng([seed, split_seed, c, i])
        buf = io.BytesIO()
        make_image(shape, rng, min_side, max_side, clutter, colors).save(buf, "JPEG", quality=quality)
        (d / f"{shape}_{i:05d}.jpg").write_bytes(buf.getvalue())
        sizes.append(buf.tell())
    return sizes


def synth_dataset(out: str | Path, classes: int = 10, per_class: int = 60, val_per_class: int = 20,
                  seed: int = 0, min_side: int = 96, max_side: int = 320, quality: int = 90,
                  clutter: float = 1.0, colors: int = 0, workers: int = 1) -> dict:
    """Write out/train/<class>/*.jpg and out/val/<class>/*.jpg; return a summary (also in out/synth.json).

    Each image depends only on (seed, split, class, index), so `workers` does not change the output.
    """
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"--classes must be between 1 and {len(SHAPES)}, got {classes}")
    if not 8 <= min_side <= max_side:
        raise ValueError(f"need 8 <= min_side <= max_side, got {min_side}, {max_side}")
    out = Path(out)
    if clutter < 0:
        raise ValueError(f"clutter must be >= 0, got {clutter}")
    if colors == 1 or not 0 <= colors <= len(PALETTE):
        raise ValueError(f"colors must be 0 (any RGB) or between 2 and {len(PALETTE)}, got {colors}")
    jobs = [(str(out), split, split_seed, c, shape, n, seed, min_side, max_side, quality, clutter, colors)
            for split, n, split_seed in (("train", per_class, 0), ("val", val_per_class, 1))
            for c, shape in enumerate(SHAPES[:classes])]
    if workers > 1:
        with Pool(workers) as pool:
            per_job = pool.map(_write_class, jobs)
    else:
        per_job = [_write_class(j) for j in jobs]
    sizes = [b for job in per_job for b in job]
    summary = {"root": str(out), "classes": classes, "train_per_class": per_class, "val_per_class": val_per_class,
               "seed": seed, "min_side": min_side, "max_side": max_side, "quality": quality, "clutter": clutter, "colors": colors,
               "images": len(sizes), "mean_file_bytes": float(np.mean(sizes)) if sizes else 0.0}
    (out / "synth.json").write_text(json.dumps(summary, indent=2))
    return summary
