"""Self-supervised methods: one module each (head, loss, update), shared mechanics in common.py.

    m = build_method(cfg, num_classes)
    loss, metrics = m(views, labels, epoch)   # views = [g1, g2, l1..lN]
    m.after_backward(epoch); optimizer.step(); m.after_step(step, momentum)
"""
from __future__ import annotations

from .common import SSLMethod
from .dino import DINO
from .moco import MoCo
from .swav import SwAV

METHODS = {"dino": DINO, "swav": SwAV, "moco": MoCo}


def build_method(cfg, num_classes: int) -> SSLMethod:
    """num_classes: joint-probe classes (0 disables the probe)."""
    return METHODS[cfg.method](cfg, num_classes)


__all__ = ["build_method", "SSLMethod", "DINO", "SwAV", "MoCo", "METHODS"]
