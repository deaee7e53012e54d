"""Self-supervised methods: one module each (config section and Config subclass, head, loss, update,
schedules, resume keys), registered with `@register_method`; shared mechanics in common.py.

    m = build_method(cfg, num_classes)
    loss, metrics = m(views, labels, epoch)   # views = [g1, g2, l1..lN]
    m.after_backward(epoch); optimizer.step(); m.after_step(step, **its schedules at step)
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..config import Config
from ..optim import optimizer_schedules
from .registry import METHODS, method_class, register_method
from .common import MomentumTeacher, SSLMethod
from .dino import DINO  # the built-in methods register themselves on import (in this order)
from .swav import SwAV
from .moco import MoCo


def build_method(cfg: Config, num_classes: int) -> SSLMethod[Any]:
    """num_classes: joint-probe classes (0 disables the probe)."""
    method: Callable[[Config, int], SSLMethod[Any]] = method_class(cfg.method)  # (cfg, num_classes), as every method
    return method(cfg, num_classes)


def build_schedules(cfg: Config, iters_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """Per-iteration arrays: the optimizer's (lr, wd: optim.optimizer_schedules), then the method's own
    (`SSLMethod.schedules`: the EMA momentum of DINO and MoCo)."""
    return {**optimizer_schedules(cfg, iters_per_epoch, global_batch),
            **method_class(cfg.method).schedules(cfg, iters_per_epoch)}


__all__ = ["build_method", "build_schedules", "register_method", "method_class", "SSLMethod", "MomentumTeacher",
           "DINO", "SwAV", "MoCo", "METHODS"]
