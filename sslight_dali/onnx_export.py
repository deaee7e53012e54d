"""`sslight export --format onnx`: the eval-mode backbone as an ONNX model, checked before it is written.

The model maps `images` [batch, 3, crop, crop] (float32, RGB normalised with the recipe's mean/std, crop =
the config's eval crop) to `features` [batch, D]:
  pooled  the backbone's pooled features (CNNs: global average pool; ViT-Tiny: the CLS token after the
          final norm), what `timm.create_model(name, num_classes=0)` returns;
  eval    the feature the reference's linear eval reads (evaluate.common.feature_model, as the backbone
          table's eval_cls_blocks says): ViT-Tiny the CLS tokens of its last 4 blocks, each through the
          final norm, concatenated (4 x 192 = 768-d); for the CNNs this is the pooled feature.
Every backbone in the table declares this format (backbones.Backbone.formats).
An `eval semi` / `eval linear` checkpoint's classifier (classifier.py) goes through the same export and
verification with `logits` [batch, num_classes] as its output (export_classifier_onnx).
The batch axis is dynamic. The exporter is the one torch recommends (`torch.onnx.export(dynamo=True)`,
torch.export-based) at opset OPSET; should it fail for a model, the TorchScript exporter is tried and the
sidecar says which ran and why.

Before anything is written the model is run in onnxruntime (CPUExecutionProvider) on seeded images at
batch 1 and 7 and compared with the PyTorch model: the sidecar records the max abs and max relative error
(max abs error / max abs PyTorch feature), and an error above the bound (FP32_MAX_REL_ERR, or
FP16_MAX_REL_ERR with --fp16) is refused: exit 2, no file. `--fp16` stores weights and compute in half
precision (onnxruntime's float16 converter) with a float32 interface (keep_io_types).

onnx, onnxscript and onnxruntime are optional: they are imported when this format is asked for, and a
missing one is named in one line.
"""
from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import first_line
from .classifier import classifier_sidecar, load_classifier
from .evaluate.common import feature_model
from .export import ExportError, _check_out, check_format, load_backbone, sidecar, write_files

OPSET = 18                      # the ONNX opset written (the dynamo exporter's own, onnxscript's torchlib)
FEATURES = ("pooled", "eval")
INPUT, OUTPUT = "images", "features"
LOGITS = "logits"               # the output of an eval checkpoint's classifier
VERIFY_BATCHES = (1, 7)         # two batch sizes, neither the one traced with: the batch axis must be dynamic
TRACE_BATCH = 2
VERIFY_SEED = 0
# Refusal bounds on the max relative error (max abs error / max abs PyTorch feature) against the fp32
# PyTorch model: float32 rounding differences only, and half-precision weights and activations (the
# README gives the errors measured on each backbone).
FP32_MAX_REL_ERR = 1e-4
FP16_MAX_REL_ERR = 1e-2
# the packages this format needs, with what `pip install` calls them
REQUIRED = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}


def require() -> dict:
    """The optional modules, imported here so that the other formats and `sslight --help` never need them."""
    mods = {}
    for module, package in REQUIRED.items():
        try:
            mods[module] = importlib.import_module(module)
        except ImportError:
            raise ExportError(f"--format onnx needs the Python package {package!r}: "
                              f"pip install {' '.join(REQUIRED.values())}") from None
    return mods


def feature_module(backbone: nn.Module, arch: str, feature: str) -> nn.Module:
    if feature not in FEATURES:
        raise ExportError(f"--feature must be one of {FEATURES}, got {feature!r}")
    return (feature_model(backbone, arch) if feature == "eval" else backbone).eval()


def export_proto(model: nn.Module, crop: int, output: str = OUTPUT):
    """(ONNX ModelProto, exporter used, why the dynamo exporter was not used or None)."""
    example = (torch.zeros(TRACE_BATCH, 3, crop, crop),)
    names = dict(input_names=[INPUT], output_names=[output], opset_version=OPSET)
    try:
        program = torch.onnx.export(model, example, dynamo=True, verbose=False, optimize=True,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), **names)
        return program.model_proto, "dynamo", None
    except Exception as e:  # noqa: BLE001  the exporter raises many types; the reason goes into the sidecar
        why = f"{type(e).__name__}: {first_line(e)}"
    import onnx  # optional: onnx (see require)
    buf = io.BytesIO()
    try:
        torch.onnx.export(model, example, buf, dynamo=False, dynamic_axes={INPUT: {0: "batch"}, output: {0: "batch"}},
                          **names)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"--format onnx: neither exporter could export the model (dynamo: {why}; "
                          f"torchscript: {type(e).__name__}: {e})") from None
    return onnx.load_from_string(buf.getvalue()), "torchscript", why


def to_fp16(proto):
    """Half-precision weights and compute, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # optional: onnxruntime (see require)
    return convert_float_to_float16(proto, keep_io_types=True)


def verify_images(batch: int, crop: int, mean, std, seed: int) -> torch.Tensor:
    """Seeded uniform [0, 1] RGB pixels normalised as the eval view is."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, crop, crop, generator=g)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def verify(data: bytes, model: nn.Module, crop: int, mean, std, bound: float, output: str = OUTPUT) -> dict:
    """Run the serialised model in onnxruntime (CPU) against `model`; raise ExportError above `bound`."""
    import onnxruntime as ort  # optional: onnxruntime (see require)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: its graph-optimiser notes are not the user's concern
    try:
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"--format onnx: onnxruntime cannot load the exported model ({e})") from None
    abs_err, scale = 0.0, 0.0
    for i, batch in enumerate(VERIFY_BATCHES):
        x = verify_images(batch, crop, mean, std, VERIFY_SEED + i)
        ref = model(x).float().numpy()
        try:
            got = session.run([output], {INPUT: x.numpy()})[0]
        except Exception as e:  # noqa: BLE001  e.g. a batch axis fixed at export
            raise ExportError(f"--format onnx: verification failed: onnxruntime cannot run batch {batch} "
                              f"({first_line(e)})") from None
        if got.shape != ref.shape:
            raise ExportError(f"--format onnx: verification failed: batch {batch} gives {output} of shape "
                              f"{list(got.shape)}, PyTorch {list(ref.shape)}")
        abs_err = max(abs_err, float(np.abs(got.astype(np.float64) - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
    result = {"provider": "CPUExecutionProvider", "onnxruntime": ort.__version__, "batches": list(VERIFY_BATCHES),
              "seed": VERIFY_SEED, "input": "uniform [0, 1] pixels normalised with mean/std",
              "max_abs_err": abs_err, "max_rel_err": rel_err, "max_abs_feature": scale,
              "rel_err": "max abs error / max abs PyTorch feature", "max_rel_err_bound": bound}
    if not rel_err <= bound:
        raise ExportError(f"--format onnx: verification failed: onnxruntime's {output} differ from PyTorch's by "
                          f"{rel_err:.3g} (max abs error / max abs value), above the bound {bound:g}; "
                          "nothing written")
    return result


def onnx_model(model: nn.Module, crop: int, mean, std, fp16: bool, output: str = OUTPUT) -> tuple[bytes, dict]:
    """(serialised ONNX model, the sidecar's "onnx" entry) for the eval-mode `model`, once onnxruntime has
    reproduced its outputs within the bound (ExportError otherwise)."""
    mods = require()
    torch_threads = torch.get_num_threads()
    try:
        proto, exporter, dynamo_error = export_proto(model, crop, output)
    finally:
        torch.set_num_threads(torch_threads)  # the exporter may change it
    if fp16:
        proto = to_fp16(proto)
    data = proto.SerializeToString()
    check = verify(data, model, crop, mean, std, FP16_MAX_REL_ERR if fp16 else FP32_MAX_REL_ERR, output)
    with torch.no_grad():
        dim = int(model(verify_images(1, crop, mean, std, VERIFY_SEED)).shape[1])
    meta = {
        "opset": OPSET, "exporter": exporter, "torch": torch.__version__, "onnx": mods["onnx"].__version__,
        "input": {"name": INPUT, "shape": ["batch", 3, crop, crop], "dtype": "float32"},
        "output": {"name": output, "shape": ["batch", dim], "dtype": "float32"},
        "dynamic_axes": {INPUT: {"0": "batch"}, output: {"0": "batch"}},
        "precision": "float16" if fp16 else "float32", "verification": check,
    }
    if dynamo_error:
        meta["dynamo_error"] = dynamo_error
    return data, meta


def write_onnx(out: Path, data: bytes, meta: dict) -> None:
    write_files({out: lambda f: f.write(data),
                 out.with_name(out.name + ".json"): lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode())})


def export_onnx(checkpoint, out, weights: str = "student", feature: str = "pooled", fp16: bool = False) -> dict:
    """Write the ONNX model to `out` and its sidecar to `out`.json, once onnxruntime has reproduced the
    PyTorch features within the bound; returns the sidecar."""
    checkpoint, out = Path(checkpoint), Path(out)
    require()
    _check_out(out, checkpoint, with_sidecar=True)
    pre = load_backbone(checkpoint, weights)
    arch, crop = pre.cfg.model.backbone, pre.cfg.eval.crop
    check_format(arch, "onnx")
    mean, std = list(pre.cfg.recipe.augment.mean), list(pre.cfg.recipe.augment.std)
    model = feature_module(pre.backbone, arch, feature)
    data, onnx_meta = onnx_model(model, crop, mean, std, fp16)
    meta = sidecar(pre, "onnx", checkpoint, out)
    meta["feature_dim"] = onnx_meta["output"]["shape"][1]
    meta["onnx"] = {**onnx_meta, "feature": feature}
    write_onnx(out, data, meta)
    return meta


def export_classifier_onnx(checkpoint, out, state: dict, fp16: bool = False) -> dict:
    """An eval checkpoint's classifier (classifier.py) as ONNX: images -> `logits` [batch, num_classes],
    exported and verified as the backbone is; returns the sidecar."""
    checkpoint, out = Path(checkpoint), Path(out)
    require()
    _check_out(out, checkpoint, with_sidecar=True)
    clf = load_classifier(checkpoint, state)
    check_format(clf.pre.cfg.model.backbone, "onnx")
    crop = clf.settings.get("crop", clf.pre.cfg.eval.crop)
    mean, std = list(clf.pre.cfg.recipe.augment.mean), list(clf.pre.cfg.recipe.augment.std)
    data, onnx_meta = onnx_model(clf.model, crop, mean, std, fp16, LOGITS)
    meta = classifier_sidecar(clf, "onnx", checkpoint)
    meta["onnx"] = onnx_meta
    write_onnx(out, data, meta)
    return meta
