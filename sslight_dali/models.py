"""Backbones: timm models configured to match the reference's
(src/sslight/backbone/{mnv2,resnet,vision_transformer}.py).

Every backbone returns pooled features [B, D] (`num_classes=0`) and exposes `.num_features`.
"""
from __future__ import annotations

from torch import nn

BACKBONES = ("mobilenetv2_100", "resnet18", "resnet34", "vit_tiny_patch16_224")


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
    """A randomly initialised timm backbone returning pooled features.

    ViT: CLS token after the final norm, any input size that is a multiple of the patch
    (96/128-px local crops; timm resamples pos_embed). CNNs: global average pool.
    """
    import timm  # here, not at the top: loading a config imports the method modules, and timm is slow to import

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
    if name.startswith("vit"):
        kwargs.update(dynamic_img_size=True, global_pool="token")
    elif name.startswith("resnet"):
        kwargs.update(zero_init_last=False)  # the reference keeps the last BN gamma of a block at 1
    model = timm.create_model(name, **kwargs)
    if name.startswith("vit"):
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
    from timm.layers import convert_sync_batchnorm
    return convert_sync_batchnorm(model)
