"""A pre-trained backbone out of a training checkpoint (each method says where it keeps it: `backbone_keys`).

Evaluation, export and the demo all start here. The student is what the reference evaluates; the
momentum teacher (DINO, MoCo) is there on request. SwAV has a single network, so both names give it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .methods import METHODS
from .models import build_backbone
from .run_config import config_from_dict

# (student, teacher) backbone prefix of each built-in method, as its class declares (`backbone_keys`);
# the reference's checkpoints use the same names (export.py reads them).
BACKBONE_PREFIX = {name: (m.backbone_keys["student"], m.backbone_keys["teacher"]) for name, m in METHODS.items()}
WEIGHTS = ("student", "teacher")


@dataclass
class Pretrained:
    backbone: nn.Module  # on the CPU, eval mode
    cfg: Config          # the run's resolved config, as stored in the checkpoint
    weights: str         # "student" or "teacher"
    epoch: int
    step: int
    path: Path


def backbone_state(state: dict, method: str, weights: str, path) -> dict:
    """The backbone's own keys (timm names) out of a method state_dict."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if method not in METHODS:
        raise ckpt.CheckpointError(f"{path}: unknown method {method!r} in the checkpoint")
    prefix = METHODS[method].backbone_keys.get(weights)
    if prefix is None:
        raise ckpt.CheckpointError(f"{path}: method {method!r} does not say where its {weights} backbone is "
                                   "(backbone_keys)")
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ckpt.CheckpointError(f"{path}: no '{prefix}*' keys: not a {method} checkpoint of this project")
    return out


def load_pretrained(path: str | Path, weights: str = "student") -> Pretrained:
    """Rebuild the backbone of a checkpoint written by `sslight train` and load its weights strictly."""
    path = Path(path)
    state = ckpt.load(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ckpt.CheckpointError(f"{path}: not an sslight-dali training checkpoint (no 'model'/'config' entries)")
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{path}: its config: {e}") from None
    model = build_backbone(cfg.model.backbone)
    sd = backbone_state(state["model"], cfg.method, weights, path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ckpt.CheckpointError(f"{path}: backbone keys do not fit {cfg.model.backbone} "
                                   f"({'missing' if missing else 'unexpected'} key {first!r})")
    return Pretrained(model.eval(), cfg, weights, int(state.get("epoch", 0)), int(state.get("step", 0)), path)
