"""The classifier an `sslight eval semi` / `sslight eval linear` run trained, rebuilt from its checkpoint.

An eval checkpoint (evaluate.common.EpochLoop.state_dict) holds "eval_settings" and "model", the state of
the part the run trained:
  semi    the whole SemiModel (fine-tuned backbone + MLP head), as evaluate.semi builds it;
  linear  (reference protocol) the `fc` layer only: the frozen backbone is the pre-training checkpoint's
          named in eval_settings["checkpoint"], read through the eval's own feature path
          (evaluate.common.feature_model: ViT-Tiny the last 4 blocks' CLS tokens, the CNNs pooled features)
          in evaluate.linear.FrozenLinear.
The fast linear protocol trains on cached features and saves no checkpoint, so it has nothing to export.
The model is returned in eval mode: images [B, 3, crop, crop] (normalised as the eval view) -> logits [B, C].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .evaluate.common import feature_model
from .evaluate.linear import FrozenLinear
from .evaluate.semi import SemiModel
from .data import list_samples
from .export import ExportError, _check_out, load_backbone, safetensors_bytes, sidecar, write_files
from .pretrained import Pretrained

CLASSIFIER_FORMATS = ("onnx", "timm")


@dataclass
class Classifier:
    model: nn.Module     # eval mode, CPU: images -> logits
    pre: Pretrained      # the pre-training checkpoint the eval ran on (config, mean/std, arch)
    kind: str            # "semi" or "linear"
    settings: dict       # the eval checkpoint's eval_settings
    num_classes: int
    classes: list | None  # class names in label order, when the eval's data says them
    epoch: int           # eval epochs done


def eval_state(path) -> dict | None:
    """The checkpoint's contents when it is one `sslight eval semi|linear` wrote, else None."""
    path = Path(path)
    if not path.is_file():
        return None  # the backbone export names the missing file
    try:
        state = ckpt.load(path)
    except ckpt.CheckpointError:
        return None  # the backbone export says what is wrong with it
    return state if isinstance(state, dict) and "eval_settings" in state else None


def _pretraining(settings: dict, path: Path) -> Pretrained:
    source = Path(settings.get("checkpoint", ""))
    if not settings.get("checkpoint") or not source.is_file():
        raise ExportError(f"{path}: the pre-training checkpoint this eval ran on is missing: "
                          f"{settings.get('checkpoint')!r} (eval_settings['checkpoint'])")
    return load_backbone(source, settings.get("weights", "student"))


def _class_names(kind: str, settings: dict, pre: Pretrained, num_classes: int) -> list | None:
    """Class names in label order: a semi run's subset file (label,wnid columns), else the pre-training
    config's train split; None when neither can be read or they do not give `num_classes` names."""
    names = {}
    subset = Path(settings.get("subset") or "")
    if kind == "semi" and subset.is_file():
        for line in subset.read_text().splitlines():
            parts = line.split(",")
            if len(parts) == 4 and parts[1].strip().isdigit():
                names[int(parts[1])] = parts[2].strip()
    if sorted(names) == list(range(num_classes)):
        return [names[i] for i in range(num_classes)]
    try:
        classes = list_samples(pre.cfg.data.root, pre.cfg.data.train_split, pre.cfg.data.format, check=False).classes
    except Exception:  # noqa: BLE001  a missing or moved dataset: the names are optional
        return None
    return list(classes) if len(classes) == num_classes else None


def load_classifier(path, state: dict) -> Classifier:
    """The eval run's classifier, its weights loaded strictly."""
    path = Path(path)
    settings, sd = state["eval_settings"], state["model"]
    kind = "semi" if "subset" in settings else "linear"
    pre = _pretraining(settings, path)
    if kind == "semi":
        if "head.fc3.weight" not in sd or "head.fc1.weight" not in sd:
            raise ExportError(f"{path}: eval semi checkpoint without the head.fc1/head.fc3 weights")
        num_classes, hidden = sd["head.fc3.weight"].shape[0], sd["head.fc1.weight"].shape[0]
        model = SemiModel(pre.backbone, hidden, num_classes)
    else:
        if settings.get("protocol") != "reference" or "weight" not in sd:
            raise ExportError(f"{path}: eval linear checkpoint without the reference protocol's fc weights")
        num_classes = sd["weight"].shape[0]
        features = feature_model(pre.backbone, pre.cfg.model.backbone)
        model = FrozenLinear(features, nn.Linear(features.num_features, num_classes))
        sd = {f"fc.{k}": v for k, v in sd.items()}
        # the backbone's own weights come from the pre-training checkpoint (already in pre.backbone)
        sd.update({f"features.{k}": v for k, v in model.features.state_dict().items()})
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ExportError(f"{path}: its weights do not fit the {kind} classifier on {pre.cfg.model.backbone} "
                          f"({ckpt.first_line(e)})") from None
    return Classifier(model.eval().requires_grad_(False), pre, kind, settings, int(num_classes),
                      _class_names(kind, settings, pre, num_classes), int(state.get("epoch", 0)))


def classifier_sidecar(clf: Classifier, fmt: str, source: Path) -> dict:
    """What the file is and how to feed it: the backbone sidecar's fields, with the eval's crop and resize."""
    meta = sidecar(clf.pre, fmt, Path(clf.settings["checkpoint"]), source)
    crop, resize = clf.settings.get("crop", clf.pre.cfg.eval.crop), clf.settings.get("resize", clf.pre.cfg.eval.resize)
    meta.update(input_size=[3, crop, crop], resize=resize, source_checkpoint=str(Path(source).resolve()))
    meta["classifier"] = {"eval": clf.kind, "num_classes": clf.num_classes, "classes": clf.classes,
                          "eval_epochs_done": clf.epoch, "pretraining_checkpoint": clf.settings["checkpoint"],
                          "output": "logits [batch, num_classes], before softmax"}
    return meta


def check_classifier_format(fmt: str, path) -> None:
    if fmt not in CLASSIFIER_FORMATS:
        raise ExportError(f"--format {fmt}: {path} is an eval checkpoint (a classifier); it exports as "
                          f"{' or '.join(CLASSIFIER_FORMATS)}")


def export_classifier_state(path, out, state: dict) -> dict:
    """--format timm: the classifier's state dict (backbone + head, the keys of SemiModel / FrozenLinear)
    to `out` (safetensors for a .safetensors name, torch.save otherwise) and its sidecar; returns it."""
    path, out = Path(path), Path(out)
    _check_out(out, path, with_sidecar=True)
    clf = load_classifier(path, state)
    sd = {k: v.detach().clone() for k, v in clf.model.state_dict().items()}
    meta = classifier_sidecar(clf, "timm", path)
    meta["classifier"]["module"] = ("sslight_dali.evaluate.semi.SemiModel" if clf.kind == "semi"
                                    else "sslight_dali.evaluate.linear.FrozenLinear")
    if out.suffix == ".safetensors":
        data = safetensors_bytes(sd, clf.pre.cfg.model.backbone)
        save = lambda f: f.write(data)  # noqa: E731
    else:
        save = lambda f: torch.save(sd, f)  # noqa: E731
    write_files({out: save, out.with_name(out.name + ".json"):
                 lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode())})
    return meta
