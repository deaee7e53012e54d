"""Self-supervised methods: one module each (config section, head, loss, update, schedules, resume
keys), registered with `@register_method`; shared mechanics in common.py.

    m = build_method(cfg, num_classes)
    loss, metrics = m(views, labels, epoch)   # views = [g1, g2, l1..lN]
    m.after_backward(epoch); optimizer.step(); m.after_step(step, **its schedules at step)
"""
from __future__ import annotations

from .registry import METHODS, method_class, register_method
from .common import MomentumTeacher, SSLMethod
from .dino import DINO  # the built-in methods register themselves on import (in this order)
from .swav import SwAV
from .moco import MoCo


def build_method(cfg, num_classes: int) -> SSLMethod:
    """num_classes: joint-probe classes (0 disables the probe)."""
    return method_class(cfg.method)(cfg, num_classes)


__all__ = ["build_method", "register_method", "method_class", "SSLMethod", "MomentumTeacher", "DINO", "SwAV",
           "MoCo", "METHODS"]
