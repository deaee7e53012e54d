"""The backbone table: every backbone this project trains, evaluates and exports, one entry each.

An entry says
  name, timm_args  the timm model (`timm.create_model(name, pretrained=False, num_classes=0, **timm_args)`,
                   which returns pooled features [B, D]); `name` is also the config's `model.backbone`
  family           "cnn" or "vit": how models.build_backbone initialises it like the reference, whether it
                   trains channels-last with SyncBN (CNNs), the reference linear-eval recipe (LARS for CNNs,
                   SGD for ViT)
  eval_cls_blocks  the linear-eval feature: 0 for the pooled feature; n > 0 (ViT) for the CLS tokens of the
                   last n blocks, each through the final norm, concatenated (evaluate.common.feature_model)
  torchvision_key  timm key -> torchvision key, or None: `sslight export --format torchvision` refuses it
  detectron2       its Detectron2 key map and config keys, or None: `--format detectron2` refuses it
  reference        how `sslight import-reference` finds and maps it in a reference checkpoint, or None

`sslight export` accepts timm, onnx and hf for every backbone, torchvision and detectron2 where the entry has
their map (`Backbone.formats`). Key maps are functions of one timm key, so every key is accounted for in
both directions. This module imports neither torch nor timm: config.py reads the names from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

KeyMap = Callable[[str], str]


@dataclass(frozen=True)
class Detectron2:
    key: KeyMap                # timm key -> Detectron2 key
    config: dict[str, Any]     # the MODEL.RESNETS.* keys its build_resnet_backbone needs for these weights


@dataclass(frozen=True)
class ReferenceLayout:
    key: KeyMap                # timm key -> the reference backbone's key (below its `...backbone.` prefix)
    markers: tuple[str, ...]   # reference keys that identify the layout, all present (of several entries
                               # that match, the one with most markers: ResNet34's include ResNet18's)
    config_stem: str           # configs/<method>/<config_stem>_{baseline,sslight}.yaml


@dataclass(frozen=True)
class Backbone:
    name: str
    family: Literal["cnn", "vit"]
    timm_args: dict[str, Any] = field(default_factory=dict)
    eval_cls_blocks: int = 0
    torchvision_key: KeyMap | None = None
    detectron2: Detectron2 | None = None
    reference: ReferenceLayout | None = None

    @property
    def formats(self) -> tuple[str, ...]:
        """The `sslight export --format` values this backbone can be written in."""
        return ("timm", *(("torchvision",) if self.torchvision_key else ()),
                *(("detectron2",) if self.detectron2 else ()), "onnx", "hf")


# --------------------------------------------------------------------------------------------
# key maps
# --------------------------------------------------------------------------------------------
def _split(key: str, head: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:head], ".".join(parts[head:])


def same_key(key: str) -> str:
    """timm's ResNet and DINO's ViT use torchvision's / timm's own names."""
    return key


# timm's MobileNetV2 groups torchvision's `features.1..17` into stages of these depths ...
MNV2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)
# ... and names the layers inside a block; the first block (expansion 1) has no expand conv.
MNV2_FIRST_BLOCK = {"conv_dw": "conv.0.0", "bn1": "conv.0.1", "conv_pw": "conv.1", "bn2": "conv.2"}
MNV2_BLOCK = {"conv_pw": "conv.0.0", "bn1": "conv.0.1", "conv_dw": "conv.1.0", "bn2": "conv.1.1",
              "conv_pwl": "conv.2", "bn3": "conv.3"}
# stem conv+BN is features.0, the final 1x1 conv (320 -> 1280) + BN is features.18
MNV2_ENDS = {"conv_stem": "features.0.0", "bn1": "features.0.1", "conv_head": "features.18.0", "bn2": "features.18.1"}


def mnv2_torchvision_key(key: str) -> str:
    """timm MobileNetV2 key -> torchvision `mobilenet_v2().features.<i>` key."""
    if key.startswith("blocks."):
        (_, stage, i, layer), rest = _split(key, 4)
        index = 1 + sum(MNV2_STAGE_DEPTHS[:int(stage)]) + int(i)
        return f"features.{index}.{(MNV2_FIRST_BLOCK if index == 1 else MNV2_BLOCK)[layer]}.{rest}"
    (layer,), rest = _split(key, 1)
    return f"{MNV2_ENDS[layer]}.{rest}"


def mnv2_reference_key(key: str) -> str:
    """The reference's `encoder` is torchvision's `features`: features.<i> -> encoder.<i>."""
    return "encoder." + mnv2_torchvision_key(key)[len("features."):]


# Detectron2's ResNet (modeling/backbone/resnet.py): BasicStem.conv1 and BasicBlock.conv1/conv2/shortcut
# are Conv2d modules that hold their BN as `.norm`; stages are res2..res5 (torchvision layer1..4).
D2_BLOCK = {"conv1": "conv1", "bn1": "conv1.norm", "conv2": "conv2", "bn2": "conv2.norm",
            "downsample.0": "shortcut", "downsample.1": "shortcut.norm"}
D2_STEM = {"conv1": "stem.conv1", "bn1": "stem.conv1.norm"}


def resnet_detectron2_key(key: str) -> str:
    """timm (= torchvision) ResNet18/34 key -> Detectron2 ResNet key (stem.conv1.norm.*, res2.0.conv1.norm.*)."""
    (layer,), rest = _split(key, 1)
    if layer in D2_STEM:
        return f"{D2_STEM[layer]}.{rest}"
    (layer, block, name), rest = _split(key, 3)
    if name == "downsample":
        (_, _, name, sub), rest = _split(key, 4)
        name = f"{name}.{sub}"
    return f"res{int(layer[len('layer'):]) + 1}.{block}.{D2_BLOCK[name]}.{rest}"


def resnet_reference_key(key: str) -> str:
    """The reference's `encoder` is torchvision's ResNet minus avgpool/fc as one Sequential: conv1, bn1,
    (relu, maxpool), layer1..4 -> encoder.0, encoder.1, encoder.4..7."""
    (layer,), rest = _split(key, 1)
    index = {"conv1": 0, "bn1": 1}[layer] if layer in ("conv1", "bn1") else 3 + int(layer[len("layer"):])
    return f"encoder.{index}.{rest}"


def resnet_detectron2(depth: int) -> Detectron2:
    """R18/R34: BasicBlock stages, which build_resnet_backbone accepts only with RES2_OUT_CHANNELS 64."""
    return Detectron2(resnet_detectron2_key, {
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision's convention (Detectron2's converter sets it)
    })


# --------------------------------------------------------------------------------------------
# the table (its order is the order `model.backbone`'s error message lists the choices in)
# --------------------------------------------------------------------------------------------
RESNET_ARGS = {"zero_init_last": False}  # the reference keeps the last BN gamma of a block at 1
# ViT: the CLS token after the final norm, any input size that is a multiple of the patch (96/128-px local
# crops; timm resamples pos_embed)
VIT_ARGS = {"dynamic_img_size": True, "global_pool": "token"}
RESNET_MARKER = "encoder.4.0.conv1.weight"  # layer1's first block; R34's layer1 has a third, R18's not

BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("mobilenetv2_100", "cnn", torchvision_key=mnv2_torchvision_key,
             reference=ReferenceLayout(mnv2_reference_key, ("encoder.1.conv.0.0.weight",), "mobilenetv2")),
    Backbone("resnet18", "cnn", RESNET_ARGS, torchvision_key=same_key, detectron2=resnet_detectron2(18),
             reference=ReferenceLayout(resnet_reference_key, (RESNET_MARKER,), "resnet18")),
    Backbone("resnet34", "cnn", RESNET_ARGS, torchvision_key=same_key, detectron2=resnet_detectron2(34),
             reference=ReferenceLayout(resnet_reference_key, (RESNET_MARKER, "encoder.4.2.conv1.weight"), "resnet34")),
    Backbone("vit_tiny_patch16_224", "vit", VIT_ARGS, eval_cls_blocks=4,
             reference=ReferenceLayout(same_key, ("cls_token",), "vit_tiny")),
)}


def backbone_entry(name: str) -> Backbone:
    """The table entry of `name`; ValueError naming the choices otherwise."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
    return BACKBONES[name]
