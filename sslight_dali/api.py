"""The Python API: what the `sslight` commands do, as functions that return their results.

    from sslight_dali import api
    run = api.train("dino/resnet18_sslight", {"data.root": "/data/in1k", "train.epochs": 5})
    checkpoint = run["output_dir"] + "/checkpoint.pt"
    api.evaluate("knn", checkpoint)
    api.export(checkpoint, "hf", "out/dino-r18")
    api.embed(checkpoint, "/data/in1k", "emb.npz")
    backbone = api.load_backbone("out/dino-r18")

Overrides: one dict {dotted config key: Python value}, the keys of `sslight config show` (a bare leaf name
works where it is unambiguous, as on the command line: {"resume": "auto"}). The values are passed to the
config as JSON, so strings stay strings. The command line passes its own `key=value` strings, which are
taken as they are.

Each function returns the dict the command prints or writes (rank 0's, under torchrun), and raises the
error the command prints as its one line (ConfigError, CheckpointError, DataError, ExportError, ...);
nothing calls sys.exit. Importing this module, like `import sslight_dali`, imports neither torch nor DALI:
each function imports what it runs.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from argparse import Namespace
from pathlib import Path

EVALS = ("linear", "semi", "knn")
EXPORT_FORMATS = ("timm", "torchvision", "detectron2", "onnx", "hf")


def override_strings(overrides) -> list[str]:
    """A dict {dotted key: value} -> the command line's `key=value` strings (a list of those is kept)."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={json.dumps(str(v) if isinstance(v, os.PathLike) else v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise TypeError("overrides: a dict {dotted key: value} (or a list of 'key=value' strings), not a string")
    return [str(o) for o in overrides]


def train(config, overrides=None) -> dict:
    """Pre-train (`sslight train CONFIG`); returns the run's summary. `config`: a shipped name or a YAML path."""
    # light: each function imports what it runs (torch, DALI), so `import sslight_dali.api` stays light
    from .run_config import load_config
    from .train import train as run
    return run(load_config(config, override_strings(overrides)))


def evaluate(kind: str, checkpoint, overrides=None, out="", weights: str = "student", subset=None) -> dict | None:
    """`sslight eval KIND CHECKPOINT` (kind: linear, semi, knn); returns what it writes to OUT/eval_KIND.json
    (OUT: `out`, or <checkpoint dir>/eval_KIND). None on ranks other than 0, and when a run stopped before
    its first result (train.max_steps). semi needs `subset` (1, 10 or a subset file)."""
    from .config import ConfigError  # light: as train's
    if kind not in EVALS:
        raise ConfigError(f"eval kind must be one of {EVALS}, got {kind!r}")
    if kind == "semi" and subset is None:
        raise ConfigError("eval semi needs subset: 1, 10 or a subset file")
    args = Namespace(checkpoint=str(checkpoint), weights=weights, out=str(out or ""),
                     subset=None if subset is None else str(subset), overrides=override_strings(overrides))
    path = (Path(out) if out else Path(checkpoint).parent / f"eval_{kind}") / f"eval_{kind}.json"
    started = time.time()
    importlib.import_module(f"sslight_dali.evaluate.{kind}").main(args)  # the command's module, when it runs
    if int(os.environ.get("RANK", "0")) != 0 or not path.is_file() or path.stat().st_mtime < started - 1:
        return None
    return json.loads(path.read_text())


def export(checkpoint, format: str, out, weights: str = "student", feature: str | None = None,  # noqa: A002
           fp16: bool = False) -> dict:
    """`sslight export CHECKPOINT --format FORMAT --out OUT`; returns the sidecar (OUT.json; hf: OUT/sslight.json).
    `feature` and `fp16` are for onnx only. A checkpoint of `eval semi` / `eval linear` (reference protocol)
    exports its classifier (eval-mode backbone + trained head, logits out) as onnx or timm (a state dict);
    its weights and feature are the eval run's."""
    from .export import ExportError  # light: as train's
    if format not in EXPORT_FORMATS:
        raise ExportError(f"--format must be one of {EXPORT_FORMATS}, got {format!r}")
    if format != "onnx":
        for option, given in (("--fp16", fp16), ("--feature", feature)):
            if given:
                raise ExportError(f"{option} is for --format onnx only")
    from .classifier import eval_state  # light: as train's
    state = eval_state(checkpoint)
    if state is not None:  # an `eval semi|linear` checkpoint: its classifier, logits out
        return _export_classifier(checkpoint, format, out, state, feature, fp16)
    if format == "onnx":
        from .onnx_export import export_onnx  # light: as train's (and it needs the optional onnx packages)
        return export_onnx(checkpoint, out, weights, feature or "pooled", fp16)
    if format == "hf":
        from .hub_export import export_hf  # light: as train's
        return export_hf(checkpoint, out, weights)
    from .export import export as export_file  # light: as train's
    return export_file(checkpoint, out, format, weights)


def _export_classifier(checkpoint, format, out, state: dict, feature, fp16: bool) -> dict:  # noqa: A002
    from .classifier import check_classifier_format, export_classifier_state  # light: as train's
    from .export import ExportError  # light: as train's
    check_classifier_format(format, checkpoint)
    if feature:
        raise ExportError(f"--feature: {checkpoint} is an eval checkpoint; it exports its classifier (logits out), "
                          "whose feature is the eval's")
    if format == "onnx":
        from .onnx_export import export_classifier_onnx  # light: as train's (and it needs the optional onnx packages)
        return export_classifier_onnx(checkpoint, out, state, fp16)
    return export_classifier_state(checkpoint, out, state)


def embed(checkpoint, data=None, out="embeddings.npz", overrides=None, split: str = "val",
          weights: str = "student") -> dict:
    """`sslight embed CHECKPOINT data.root=DATA --out OUT`: eval-view features of every image of `split`
    to OUT (.npz, or .parquet with pyarrow); returns the summary. `data`: the data root (default: the
    checkpoint's data.root); its format is data.format (an override)."""
    from .embed import embed as run  # light: as train's
    strings = override_strings(overrides)
    if data is not None:
        strings = [f"data.root={json.dumps(str(data))}"] + strings
    return run(checkpoint, out, strings, split, weights)


def load_backbone(path, weights: str = "student"):
    """The backbone (eval mode, on the CPU, pooled features out) from a training checkpoint, a timm export
    (FILE.pth or FILE.safetensors with its FILE.json sidecar) or an hf export folder."""
    from .hub_export import load_export  # light: as train's
    return load_export(path, weights)
