"""Backbones: timm models configured to match the reference's
(src/sslight/backbone/{mnv2,resnet,vision_transformer}.py).

Every backbone returns pooled features [B, D] (`num_classes=0`) and exposes `.num_features`; which
backbones there are and how each is made is the backbone table's (backbones.py).
"""
from __future__ import annotations

from torch import nn

from .backbones import backbone_entry


def reference_conv_bn_init_(model: nn.Module) -> None:
    # The reference inits convs with torch's kaiming_normal(fan_out), whose fan_out ignores groups.
    # timm's MobileNetV2 divides fan_out by groups, so its depthwise convs start ~sqrt(C) larger.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_backbone(name: str, drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised timm backbone returning pooled features, made as its entry in the
    backbone table (backbones.BACKBONES) says and initialised like the reference's."""
    import timm  # light: loading a config imports the method modules; timm takes seconds to import

    entry = backbone_entry(name)
    model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **entry.timm_args)
    if entry.family == "vit":
        # DINO's ViT draws cls_token like pos_embed; timm uses N(0, 1e-6).
        nn.init.trunc_normal_(model.cls_token, std=0.02)
    else:
        reference_conv_bn_init_(model)
    return model


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm layer as a SyncBatchNorm (statistics over all processes; CUDA-only in PyTorch).
    timm's converter, not torch's: timm's MobileNetV2 keeps the ReLU6 inside its BN layers
    (BatchNormAct2d calls its `act` child in forward), and torch's converter swaps them for plain
    SyncBatchNorm layers that never call it, silently dropping every activation after a BN. timm's
    gives SyncBatchNormAct (a SyncBatchNorm subclass), with the same state_dict keys."""
    from timm.layers import convert_sync_batchnorm  # light: as build_backbone
    return convert_sync_batchnorm(model)
