"""`sslight export` and `sslight import-reference`: backbone weights in and out of this project.

export: the student (or teacher) backbone of a training checkpoint, alone, in the key names of
  timm        `timm.create_model(name, num_classes=0)` loads it strictly (our backbones are timm models);
  torchvision (backbones with a torchvision map) `resnet18/34()` / `mobilenet_v2()` load it with only
              `fc.*` / `classifier.*` missing;
  detectron2  (backbones with a Detectron2 map) the pickle Detectron2's checkpointer reads for an R18/R34
              `build_resnet_backbone`
              ({"model": numpy arrays, "__author__", "matching_heuristics": True}), named as MoCo's
              and Detectron2's own torchvision converters name them; FILE must end in .pkl.
  onnx        the eval-mode model, verified in onnxruntime before it is written: onnx_export.py (api.export
              dispatches there; it needs the optional onnx packages).
  hf          a timm hub folder (model.safetensors, config.json, model card): hub_export.py.
  timm and torchvision state dicts go to a safetensors file when FILE ends in .safetensors (torch.save
  otherwise);
  and a JSON sidecar (FILE.json) that says what the weights are and how to feed them (for detectron2
  also the config keys it needs, under "detectron2").

import-reference: checkpoints the reference's trainer writes (its released files among them), read
  without running code from them, mapped by name (the reference itself matches keys by position,
  which fails silently) onto the timm backbones, written as a checkpoint that `load_pretrained`
  accepts, so `sslight eval` and `sslight export` take it like one of ours.

Which formats a backbone has, and its key maps, are its entry in the backbone table (backbones.py);
the maps are functions of one key, applied to the timm model's own key list, so every key is accounted
for in both directions.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .backbones import BACKBONES, backbone_entry
from .config import ConfigError, find_file, to_dict
from .run_config import load_config
from .models import build_backbone
from .pretrained import BACKBONE_PREFIX, WEIGHTS, load_pretrained

FORMATS = ("timm", "torchvision", "detectron2")


class ExportError(ValueError):
    """Bad input to export/import (option, file, or a key that does not map); the message names it."""


# --------------------------------------------------------------------------------------------
# key maps (each backbone's are in its backbone table entry, backbones.py)
# --------------------------------------------------------------------------------------------
def check_format(backbone: str, fmt: str) -> None:
    """Refuse a format the backbone's table entry does not declare (it has no key map for it)."""
    formats = backbone_entry(backbone).formats
    if fmt not in formats:
        raise ExportError(f"--format {fmt}: {backbone} has no {fmt} equivalent; it exports as "
                          f"{', '.join(formats)}")


def reference_key(key: str, backbone: str) -> str:
    """timm key -> the reference backbone's key (below its `...backbone.` prefix)."""
    return backbone_entry(backbone).reference.key(key)


def key_map(keys, backbone: str, fmt: str) -> dict[str, str]:
    """{timm key: key in `fmt`} for every key of the backbone; fmt: timm, torchvision, detectron2, reference."""
    entry = backbone_entry(backbone)
    if fmt == "timm":
        return {k: k for k in keys}
    if fmt == "reference":
        name = entry.reference.key
    else:
        check_format(backbone, fmt)
        name = entry.torchvision_key if fmt == "torchvision" else entry.detectron2.key
    return {k: name(k) for k in keys}


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def exported_state(backbone: torch.nn.Module, name: str, fmt: str) -> dict:
    """The backbone's state dict renamed for `fmt` (tensors, or numpy arrays for detectron2)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    sd = backbone.state_dict()
    names = key_map(sd.keys(), name, fmt)
    out = {names[k]: v.detach().cpu().clone() for k, v in sd.items()}
    if fmt == "detectron2":
        return {"model": {k: v.numpy() for k, v in out.items()}, "__author__": "sslight-dali",
                "matching_heuristics": True}
    return out


def detectron2_settings(pre, out: Path) -> dict:
    """The Detectron2 config keys these weights need, as `cfg.merge_from_list` takes them: torchvision-style
    RGB input normalised on 0-255 pixels (Detectron2 normalises before the backbone), and the backbone's own
    (its table entry's: for R18/R34 the BasicBlock ResNet)."""
    aug = pre.cfg.recipe.augment
    return {
        "MODEL.WEIGHTS": str(out.resolve()),
        "MODEL.PIXEL_MEAN": [round(m * 255, 6) for m in aug.mean],
        "MODEL.PIXEL_STD": [round(x * 255, 6) for x in aug.std],
        "INPUT.FORMAT": "RGB",
        **backbone_entry(pre.cfg.model.backbone).detectron2.config,
    }


def sidecar(pre, fmt: str, source: Path, out: Path) -> dict:
    cfg = pre.cfg
    meta = {
        "arch": cfg.model.backbone, "timm_name": cfg.model.backbone, "feature_dim": int(pre.backbone.num_features),
        "method": cfg.method, "recipe": cfg.data.recipe, "epoch": pre.epoch, "step": pre.step,
        "weights": pre.weights, "format": fmt,
        "mean": list(cfg.recipe.augment.mean), "std": list(cfg.recipe.augment.std),  # RGB, on [0, 1] pixels
        "input_size": [3, cfg.eval.crop, cfg.eval.crop], "resize": cfg.eval.resize, "interpolation": "bicubic",
        "source_checkpoint": str(source.resolve()),
    }
    if fmt == "detectron2":
        meta["detectron2"] = detectron2_settings(pre, out)
    return meta


def _write(path: Path, write_fn) -> Path:
    """Write to a hidden temp file beside `path`; the caller renames it in place once all parts are written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_files(files: dict[Path, callable], option: str = "--out") -> None:
    """Write every file or none: all go to temp files first, then each is renamed into place. Missing
    folders are made here, once the inputs have been checked, as `cp`-like tools do not but users of
    `--out` expect."""
    for path in files:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"{option} {path}: cannot create directory {path.parent} ({e.strerror})") from None
    tmps = {}
    try:
        for path, fn in files.items():
            tmps[path] = _write(path, fn)
    except OSError as e:
        for t in tmps.values():
            t.unlink(missing_ok=True)
        raise ExportError(f"{option} {path}: cannot write ({e.strerror or e})") from None
    for path, tmp in tmps.items():
        os.replace(tmp, path)


def _check_out(out: Path, source: Path, with_sidecar: bool) -> None:
    for p in (out, out.with_name(out.name + ".json")) if with_sidecar else (out,):
        if source.exists() and p.exists() and p.samefile(source):
            raise ExportError(f"--out {out}: would overwrite the input {source}")
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory")


# --------------------------------------------------------------------------------------------
# safetensors (--format timm|torchvision with a .safetensors name; the hub folder's model.safetensors)
# --------------------------------------------------------------------------------------------
def require_safetensors():
    """safetensors.torch, optional: only .safetensors outputs need it."""
    try:
        import safetensors.torch  # optional: safetensors, for .safetensors outputs only
    except ImportError:
        raise ExportError("a .safetensors output needs the Python package 'safetensors': "
                          "pip install safetensors") from None
    return safetensors.torch


def safetensors_bytes(state: dict, arch: str) -> bytes:
    """The state dict as a safetensors file (contiguous tensors, no shared storage), as timm's loader reads it."""
    tensors = {k: v.contiguous() for k, v in state.items()}
    return require_safetensors().save(tensors, metadata={"format": "pt", "arch": arch})


def load_backbone(checkpoint: Path, weights: str):
    """load_pretrained, with a reference checkpoint named as such (it needs import-reference first)."""
    if weights not in WEIGHTS:
        raise ExportError(f"--weights must be one of {WEIGHTS}, got {weights!r}")
    try:
        return load_pretrained(checkpoint, weights)
    except ckpt.CheckpointError as e:
        if _looks_like_reference(checkpoint):
            raise ExportError(f"{checkpoint}: a reference SSLight checkpoint, not one of this project's; convert it "
                              f"first: sslight import-reference {checkpoint} --out FILE") from None
        raise ckpt.CheckpointError(ckpt.first_line(e)) from None


def export(checkpoint, out, fmt: str = "timm", weights: str = "student") -> dict:
    """Write the backbone (`fmt` key names) to `out` and its sidecar to `out`.json; returns the sidecar."""
    checkpoint, out = Path(checkpoint), Path(out)
    if fmt == "detectron2" and out.suffix != ".pkl":
        raise ExportError(f"--out {out}: --format detectron2 needs a name ending in .pkl: Detectron2's "
                          "DetectionCheckpointer reads a file as a pickle only when its name ends in .pkl "
                          "(any other it hands to torch.load, which fails)")
    safetensors = out.suffix == ".safetensors"  # timm or torchvision keys, in a safetensors file
    if safetensors:
        require_safetensors()
    _check_out(out, checkpoint, with_sidecar=True)
    pre = load_backbone(checkpoint, weights)
    state = exported_state(pre.backbone, pre.cfg.model.backbone, fmt)
    meta = sidecar(pre, fmt, checkpoint, out)
    if safetensors:
        data = safetensors_bytes(state, pre.cfg.model.backbone)
        save = lambda f: f.write(data)  # noqa: E731
    elif fmt == "detectron2":
        save = lambda f: pickle.dump(state, f)  # noqa: E731  Detectron2 reads .pkl with pickle
    else:
        save = lambda f: torch.save(state, f)  # noqa: E731
    write_files({out: save, out.with_name(out.name + ".json"):
                 lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode())})
    return meta


# --------------------------------------------------------------------------------------------
# import-reference
# --------------------------------------------------------------------------------------------
# The reference's trainer (src/sslight/engine/trainer.py save_checkpoint) writes
#   {"config": fvcore CfgNode, "epoch", "steps", "state_dict" (DDP: "module." keys), "optimizer",
#    "loss" (DINO: its center buffer), "fp16_scaler" (optional)}
# with torch.save. torch.load's safe (weights_only) unpickler refuses the CfgNode, and a plain unpickler
# would run whatever code a file names. So the file is read with an unpickler that builds tensors,
# containers and numbers only: a CfgNode (a dict subclass) becomes a plain dict, anything not listed
# here is refused by name.
class _CfgNode(dict):
    """A yacs/fvcore CfgNode read as a dict. Pickle hands the node's own attributes (__immutable__,
    __deprecated_keys__, ...) to BUILD: they say nothing about the run, so they are dropped, never applied."""

    def __setstate__(self, state):
        pass


CFG_NODES = {("yacs.config", "CfgNode"), ("fvcore.common.config", "CfgNode")}
SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"),
    ("torch", "device"),
    # a CfgNode's __deprecated_keys__ is a set; protocol 2 names builtins by their Python 2 module
    ("builtins", "set"), ("__builtin__", "set"), ("builtins", "frozenset"), ("__builtin__", "frozenset"),
    # numpy scalars (the trainer's LR and weight decay in the optimizer's param_groups) and arrays
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
    ("_codecs", "encode"),  # numpy scalars pickle their bytes through it
}


class _ReferenceUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in CFG_NODES:
            return _CfgNode
        if (module, name) in SAFE_GLOBALS or (module == "numpy" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


_reference_pickle = types.SimpleNamespace(Unpickler=_ReferenceUnpickler, load=pickle.load, __name__="reference_pickle")


def _not_torch_file(path: Path) -> str | None:
    """Why `path` cannot be a torch.save file, judged from its bytes without loading it; None if it may be one.
    torch.save writes a zip archive holding <name>/data.pkl, or (legacy format) a pickle whose first object is
    torch's magic number."""
    with open(path, "rb") as f:
        head = f.read(8)
        if not head:
            return "the file is empty"
        if head.startswith(b"PK"):
            if not zipfile.is_zipfile(f):
                return "a truncated or damaged zip archive (no zip directory at its end)"
            try:
                with zipfile.ZipFile(f) as z:
                    names = z.namelist()
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                return f"a damaged zip archive ({ckpt.first_line(e)})"
            if not any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
                return "a zip archive without the data.pkl that torch.save writes"
            return None
        if head[0] != 0x80:  # every pickle of protocol 2 or later starts with PROTO
            return f"neither a zip archive nor a pickle (it starts with {head!r})"
        f.seek(0)
        try:
            first = _ReferenceUnpickler(f).load()
        except pickle.UnpicklingError as e:
            if not str(e).startswith("refusing to load"):
                return f"neither a zip archive nor a pickle ({ckpt.first_line(e)})"
            first = None  # a pickle of classes we do not load
        except Exception as e:  # noqa: BLE001  random bytes fail in many ways
            return f"neither a zip archive nor a pickle ({ckpt.first_line(e)})"
        if first != torch.serialization.MAGIC_NUMBER:
            return "a pickle, but not one torch.save wrote (no torch magic number first)"
    return None


def load_reference(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {path}")
    why = _not_torch_file(path)
    if why:
        raise ckpt.CheckpointError(f"{path}: not a PyTorch checkpoint: {why}")
    try:  # torch's wrapper resolves storage types itself and asks our find_class for everything else
        return torch.load(path, map_location="cpu", pickle_module=_reference_pickle, weights_only=False)
    except Exception as e:  # noqa: BLE001  torch raises several types for foreign files
        msg = ckpt.first_line(e)
        if isinstance(e, EOFError) or any(s in msg for s in ("truncated", "unexpected EOF", "Ran out of input")):
            raise ckpt.CheckpointError(f"{path}: not a PyTorch checkpoint: truncated (its data ends early)") from None
        raise ckpt.CheckpointError(f"{path}: cannot load ({msg})") from None


# A reference config has a few hundred values; pickle's memo lets a small file name one container many
# times (or inside itself), which a plain copy would expand without bound.
MAX_CONFIG_VALUES = 100_000


def _plain(x, path: Path | None = None):
    """Nested dicts, lists and JSON scalars: what the reference config holds, without its classes. A
    config that names a container inside itself or holds over MAX_CONFIG_VALUES values is refused."""
    count, open_ids = 0, set()

    def walk(v):
        nonlocal count
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ckpt.CheckpointError(f"{path}: its config holds over {MAX_CONFIG_VALUES} values: not a "
                                       "reference SSLight config")
        if isinstance(v, (dict, list, tuple, set, frozenset)):
            if id(v) in open_ids:
                raise ckpt.CheckpointError(f"{path}: its config contains itself: not a reference SSLight config")
            open_ids.add(id(v))
            try:
                if isinstance(v, dict):
                    return {str(k): walk(e) for k, e in v.items()}
                if isinstance(v, (set, frozenset)):
                    return sorted((walk(e) for e in v), key=repr)
                return [walk(e) for e in v]
            finally:
                open_ids.discard(id(v))
        if hasattr(v, "item") and getattr(v, "shape", None) == ():  # numpy / torch scalars
            v = v.item()
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)

    try:
        return walk(x)
    except RecursionError:
        raise ckpt.CheckpointError(f"{path}: its config is nested too deeply: not a reference SSLight config") from None


def _looks_like_reference(path: Path) -> bool:
    try:
        obj = load_reference(path)
    except Exception:  # noqa: BLE001
        return False
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, dict) and any(k.startswith("module.") and ".backbone." in k for k in sd)


def _queue_file(obj, path: Path) -> str | None:
    """The error for a SwAV queue file (the trainer's OUTPUT_DIR/queue<rank>.pth, {"queue": tensor}), else None."""
    if not (isinstance(obj, dict) and "queue" in obj and "state_dict" not in obj):
        return None
    found = sorted(str(p) for d in (path.parent / "checkpoints", path.parent) if d.is_dir()
                   for p in d.glob("*.pth.tar"))
    beside = f"e.g. {found[0]}" if found else "SWAV_<arch>_last_ckpt.pth.tar, in checkpoints/ beside it"
    return (f"{path}: a SwAV queue file (the features SwAV keeps between epochs), not a model checkpoint; "
            f"import the run's *.pth.tar checkpoint instead ({beside})")


def _reference_state(obj, path: Path) -> tuple[dict, str]:
    """(state dict, the prefix it uses for DDP: 'module.' or '') out of a reference checkpoint."""
    queue = _queue_file(obj, path)
    if queue:
        raise ExportError(queue)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ckpt.CheckpointError(f"{path}: no 'state_dict' of tensors: not a reference SSLight checkpoint")
    return sd, ("module." if any(k.startswith("module.") for k in sd) else "")


def _detect(sd: dict, ddp: str, path: Path) -> tuple[str, str, str | None]:
    """(method, backbone, teacher prefix or None) from the key layout."""
    for method, (student, teacher) in BACKBONE_PREFIX.items():
        keys = [k[len(ddp + student):] for k in sd if k.startswith(ddp + student)]
        if not keys:
            continue
        backbone = reference_layout(set(keys))
        if backbone is None:
            known = ", ".join(n for n, e in BACKBONES.items() if e.reference)
            raise ExportError(f"{path}: key {ddp + student + keys[0]!r}: unknown backbone layout "
                              f"(expected one of {known})")
        has_teacher = teacher != student and any(k.startswith(ddp + teacher) for k in sd)
        return method, backbone, (teacher if has_teacher else None)
    wanted = ", ".join(repr(ddp + s) for s, _ in BACKBONE_PREFIX.values())
    raise ExportError(f"{path}: no key starts with {wanted}: not a reference SSLight checkpoint")


def reference_layout(keys: set[str]) -> str | None:
    """The backbone whose reference layout `keys` (below the backbone prefix) have: of the table's entries
    whose markers are all present, the one with most markers."""
    found = [name for name, e in BACKBONES.items() if e.reference and all(m in keys for m in e.reference.markers)]
    return max(found, key=lambda name: len(BACKBONES[name].reference.markers), default=None)


def map_reference(sd: dict, prefix: str, backbone: str, path: Path) -> dict:
    """The keys under `prefix` renamed to timm's, checked against the timm model: all present, same shapes."""
    target = build_backbone(backbone).state_dict()
    by_ref = {v: k for k, v in key_map(target.keys(), backbone, "reference").items()}
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        name = by_ref.get(k[len(prefix):])
        if name is None:
            raise ExportError(f"{path}: key {k!r} has no counterpart in {backbone}")
        if tuple(v.shape) != tuple(target[name].shape):
            raise ExportError(f"{path}: key {k!r} has shape {tuple(v.shape)}, {backbone}.{name} "
                              f"needs {tuple(target[name].shape)}")
        out[name] = v.detach().clone()
    missing = [k for k in target if k not in out]
    if missing:
        want = prefix + reference_key(missing[0], backbone)
        raise ExportError(f"{path}: no key {want!r} for {backbone}.{missing[0]}")
    return out


def shipped_config(method: str, backbone: str, variant: str) -> Path:
    name = f"{method}/{backbone_entry(backbone).reference.config_stem}_{variant}"
    try:
        return find_file(name, "configs")
    except ConfigError:
        raise ExportError(f"no shipped config for {method} {backbone} {variant} ({name}); "
                          "name one with --config") from None


# The reference's view sampling (its config's MULTI_VIEWS_TRANSFORMS) and, for each, where our config has it:
# the only settings in which a method's baseline and sslight runs differ (reference spec §1.3, §1.6).
VIEW_KEYS = {"GLOBAL_CROPS_SCALE": lambda r: r.global_.scale, "LOCAL_CROPS_SCALE": lambda r: r.local.scale,
             "LOCAL_CROPS_NUMBER": lambda r: r.local.count, "LOCAL_CROP_SIZE": lambda r: r.local.size,
             "LAMBDAS": lambda r: r.loss_weights}
VARIANTS = ("baseline", "sslight")


def _numbers(value) -> list[float] | None:
    values = value if isinstance(value, (list, tuple)) else [value]
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return [float(v) for v in values] if ok and values else None


def _describe_views(v: dict) -> str:
    (g0, g1), (l0, l1), (n,), (size,), (w0, w1) = (v[k] for k in VIEW_KEYS)
    return (f"global scale ({g0!r}, {g1!r}), local scale ({l0!r}, {l1!r}), {n:.0f} x {size:.0f} px locals, "
            f"LAMBDAS [{w0!r}, {w1!r}]")


def choose_config(method: str, backbone: str, reference_cfg, path: Path) -> tuple[Path, str]:
    """(shipped config, why): the variant whose view sampling equals the file's reference config; the file
    name (`baseline`/`sslight` in it, as in the released files) only when the file has no config."""
    stem = f"{method}/{backbone_entry(backbone).reference.config_stem}"
    if not reference_cfg:
        named = [v for v in VARIANTS if v in path.name.lower()]
        if len(named) != 1:
            raise ExportError(f"{path}: the file has no reference config and its name says neither 'baseline' nor "
                              "'sslight'; name the config to store with --config FILE")
        return shipped_config(method, backbone, named[0]), f"the file has no config; its name says {named[0]}"
    views = reference_cfg.get("MULTI_VIEWS_TRANSFORMS") if isinstance(reference_cfg, dict) else None
    got = {}
    for key in VIEW_KEYS:
        got[key] = _numbers(views.get(key)) if isinstance(views, dict) else None
        if got[key] is None or len(got[key]) != (2 if key.endswith(("SCALE", "LAMBDAS")) else 1):
            raise ExportError(f"{path}: its reference config has no usable MULTI_VIEWS_TRANSFORMS.{key}; "
                              "name the config to store with --config FILE")
    matches = []
    for variant in VARIANTS:
        cfg_path = shipped_config(method, backbone, variant)
        recipe = load_config(cfg_path).recipe
        want = {k: _numbers(f(recipe)) for k, f in VIEW_KEYS.items()}
        if all(len(got[k]) == len(want[k]) and all(abs(a - b) <= 1e-6 for a, b in zip(got[k], want[k]))
               for k in VIEW_KEYS):
            matches.append(cfg_path)
    if len(matches) == 1:
        return matches[0], f"the file's reference config has {_describe_views(got)}"
    which = "both" if matches else "neither"
    raise ExportError(f"{path}: its reference config ({_describe_views(got)}) matches {which} {stem}_baseline "
                      f"{'and' if matches else 'nor'} {stem}_sslight; name the config to store with --config FILE")


def import_reference(src, out, config: str | None = None) -> dict:
    """Map a reference checkpoint onto this project's layout; returns a summary.

    The stored config (what `sslight eval` and the export sidecar read) is `config`, or else the shipped
    configs/<method>/<backbone>_{baseline,sslight}.yaml whose view sampling the file's own reference config
    states (choose_config). The summary says which and why (`config_reason`).
    """
    src, out = Path(src), Path(out)
    _check_out(out, src, with_sidecar=False)
    obj = load_reference(src)
    sd, ddp = _reference_state(obj, src)
    method, backbone, teacher = _detect(sd, ddp, src)
    student = BACKBONE_PREFIX[method][0]
    model = {student + k: v for k, v in map_reference(sd, ddp + student, backbone, src).items()}
    if teacher is not None:
        model.update({teacher + k: v for k, v in map_reference(sd, ddp + teacher, backbone, src).items()})
    meta = obj if isinstance(obj, dict) and "state_dict" in obj else {}
    reference_cfg = _plain(meta.get("config") or {}, src)
    if config:
        cfg_path, reason = Path(config), "given with --config"
    else:
        cfg_path, reason = choose_config(method, backbone, reference_cfg, src)
    cfg = load_config(cfg_path)
    if (cfg.method, cfg.model.backbone) != (method, backbone):
        raise ExportError(f"--config {cfg_path}: is {cfg.method} {cfg.model.backbone}, "
                          f"the checkpoint is {method} {backbone}")
    state = {
        "model": model, "config": to_dict(cfg),
        "epoch": int(meta.get("epoch", 0) or 0), "step": int(meta.get("steps", 0) or 0),
        "imported_from": {"path": str(src.resolve()), "config": str(cfg_path), "config_reason": reason,
                          "reference_config": reference_cfg},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    write_files({out: lambda f: f.write(buf.getvalue())})
    return {"method": method, "backbone": backbone, "teacher": teacher is not None, "config": str(cfg_path),
            "config_reason": reason, "epoch": state["epoch"], "step": state["step"], "keys": len(model),
            # the trainer's optimizer, DINO loss center, fp16 scaler, ...: read, not carried over
            "not_imported": sorted(k for k in meta if k not in ("state_dict", "config", "epoch", "steps")),
            "out": str(out)}


# --------------------------------------------------------------------------------------------
# CLI (arguments are declared in cli.py)
# --------------------------------------------------------------------------------------------
def import_main(args) -> int:
    summary = import_reference(args.file, args.out, args.config)
    print(json.dumps(summary, indent=2))
    name = Path(summary["config"])
    shown = f"{name.parent.name}/{name.stem}" if not args.config else str(name)
    print(f"config {shown}: {summary['config_reason']}", file=sys.stderr)
    return 0

