"""The DALI eval views against torchvision's Resize(resize, bicubic) + CenterCrop(crop), pixel by pixel.

The images are lossless PNGs, so both backends start from the same decoded pixels and what is left is
the resampling: DALI's antialiased cubic against PIL's bicubic, each rounded to uint8. Textured
images (sinusoids at several frequencies, edges and fine noise) make a 1-px shift or a 1-px
difference in the resized size cost several grey levels, far above that resampling difference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from sslight_dali.run_config import load_config
from sslight_dali.data import build_eval_loader

RESIZE = 64
# (H, W), odd and even, portrait and landscape. With crop 55 the short side leaves 9 px: torchvision's
# anchor is round(4.5) = 4, DALI's crop_pos=0.5 gave 5. 75x97: Resize gives 82 px (82.77 truncated),
# DALI's resize_shorter 83.
SIZES = [(75, 97), (97, 75), (64, 64), (81, 130), (130, 81), (100, 151), (77, 77), (90, 119)]
# Per-image mean absolute error (grey levels, 0-255) between DALI and torchvision on these images:
# measured at most 0.21 (cubic vs PIL bicubic weights, uint8 rounding; 0.0 where no resize happens).
# On the same images a 1-px crop shift measured 15.7-19.5, a resized side 1 px longer 10.4-26.8, and
# the previous graph (resize_shorter + crop_pos=0.5) 8.3-29.7 (0.21 where it happened to agree).
BOUND = 1.0


def textured(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            fy, fx = rng.uniform(0.05, 0.6, 2)
            img[..., c] += rng.uniform(20, 40) * np.sin(fy * y + fx * x + rng.uniform(0, 6.3))
        img[..., c] += 60 * (x > rng.uniform(0.3, 0.7) * w)  # an edge
    img += rng.normal(0, 12, img.shape)  # fine texture
    return np.clip(img + 128 - img.mean(), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def png_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_png")
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(textured(h, w, i)).save(root / "val" / "a" / f"{i}.png")
    Image.fromarray(textured(64, 64, 99)).save(root / "train" / "a" / "0.png")
    return root


def dali_eval(root, crop, device):
    cfg = load_config("configs/dino/resnet18_sslight.yaml", [
        f"data.root={root}", f"data.device={device}", "data.num_threads=1", f"eval.resize={RESIZE}",
        f"eval.crop={crop}", f"eval.batch_size={len(SIZES)}"])
    images, _, index = next(iter(build_eval_loader(cfg, channels_last=False)))
    mean = torch.tensor(cfg.recipe.augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.recipe.augment.std).view(1, 3, 1, 1)
    grey = (images.float().cpu() * std + mean) * 255  # back to 0-255 (float, the normalize is exact enough)
    return {int(i): g for i, g in zip(index, grey)}


def torchvision_view(path, crop, resize=RESIZE, shift=(0, 0)):
    img = T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC)(Image.open(path).convert("RGB"))
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
    top = int(round((t.shape[1] - crop) / 2.0)) + shift[0]
    left = int(round((t.shape[2] - crop) / 2.0)) + shift[1]
    return t[:, top:top + crop, left:left + crop]


DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("crop", [55, 56])
def test_eval_views_equal_torchvision_per_image(png_root, crop, device):
    views = dali_eval(png_root, crop, device)
    assert sorted(views) == list(range(len(SIZES)))
    files = sorted((png_root / "val" / "a").iterdir(), key=lambda p: int(p.stem))
    for i, path in enumerate(files):
        ref = torchvision_view(path, crop)
        assert views[i].shape == ref.shape == (3, crop, crop)
        mae = (views[i] - ref).abs().mean().item()
        assert mae < BOUND, f"{SIZES[i]}: MAE {mae:.2f} grey levels against torchvision"
        # The bugs this guards against, on the same image: the anchor one pixel off, or the resized
        # side one pixel longer (rounded instead of truncated), are each far above the bound.
        shifted = torchvision_view(path, crop, shift=(1, 0) if SIZES[i][0] <= SIZES[i][1] else (0, 1))
        assert (shifted - ref).abs().mean().item() > 3 * BOUND


@pytest.mark.parametrize("device", DEVICES)
def test_eval_view_of_an_exif_rotated_jpeg(tmp_path, device):
    # EXIF orientation 6 (rotate 90) on a 75x130 (H x W) JPEG: both backends ignore the tag, so the
    # resize target comes from the stored shape. A shape read with the orientation applied (130x75)
    # resizes to the transposed size, a distorted view far from torchvision's.
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
    Image.fromarray(textured(64, 64, 99)).save(tmp_path / "train" / "a" / "0.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "val" / "a" / "0.jpg"
    Image.fromarray(textured(75, 130, 7)).save(path, exif=exif.tobytes(), quality=100)
    view = dali_eval(tmp_path, 56, device)[0]
    mae = (view - torchvision_view(path, 56)).abs().mean().item()
    assert mae < BOUND, f"MAE {mae:.2f} grey levels against torchvision"
