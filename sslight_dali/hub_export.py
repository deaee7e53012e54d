"""`sslight export --format hf --out FOLDER`: the backbone as a timm hub folder, uploadable as is.

FOLDER holds
  model.safetensors  the backbone's state dict in timm's key names (the head-less model, num_classes=0);
  config.json        timm's hub config, written by timm's own `save_config_for_hf`: architecture,
                     num_classes 0, num_features, the model arguments our backbone is built with
                     (ViT: dynamic_img_size, token pooling) and pretrained_cfg with this run's
                     preprocessing: input_size [3, crop, crop], mean/std, bicubic, crop_pct crop/resize.
                     The default weights' provenance (tag, license, paper) is removed: these are not them;
  README.md          a model card: method, recipe, epochs, data (the folder's name, not its local path), and
                     the `sslight eval` results found beside the checkpoint
                     (<checkpoint dir>/eval_{knn,linear,semi}/eval_*.json);
  sslight.json       the sidecar every export writes (what the weights are and how to feed them).
so that `timm.create_model("local-dir:FOLDER", pretrained=True)` builds the backbone with these weights
(and `timm.create_model("hf-hub:USER/REPO", pretrained=True)` once the folder is uploaded). With
num_classes=N timm adds a fresh N-way head and loads the rest.

The folder is written whole or not at all: into a temp folder beside it, renamed into place. An existing
FOLDER is replaced only if it holds nothing but these files (an earlier export).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from timm.models._hub import save_config_for_hf  # timm's own writer: the layout is the installed timm's

from .export import ExportError, exported_state, load_backbone, require_safetensors, safetensors_bytes, sidecar
from .models import build_backbone

FILES = ("model.safetensors", "config.json", "README.md", "sslight.json")
# pretrained_cfg fields that describe timm's default weights for the architecture, not ours
NOT_OURS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id", "url")
EVALS = ("knn", "linear", "semi")


def crop_pct(crop: int, resize: int) -> float:
    """crop/resize, the float just below it where needed so that timm's eval transform, which resizes to
    floor(crop / crop_pct), resizes to `resize` (32/36 would give 35)."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def hub_config(backbone, cfg) -> dict:
    """timm's config.json for `backbone` with this run's eval preprocessing."""
    crop, resize = cfg.eval.crop, cfg.eval.resize
    data = {"input_size": (3, crop, crop), "mean": tuple(cfg.recipe.augment.mean), "std": tuple(cfg.recipe.augment.std),
            "interpolation": "bicubic", "crop_pct": crop_pct(crop, resize), "crop_mode": "center"}
    with tempfile.TemporaryDirectory() as d:
        save_config_for_hf(backbone, os.path.join(d, "config.json"), data_config=data)
        config = json.loads(Path(d, "config.json").read_text())
    for key in NOT_OURS:
        config["pretrained_cfg"].pop(key, None)
    return config


def eval_results(checkpoint: Path, epoch: int, weights: str) -> dict:
    """{kind: result} of the `sslight eval` runs of these weights, from their default output folders: the
    result must name this checkpoint file, its epoch (checkpoint.pt moves on as a run goes on) and these
    weights, and hold its top-1."""
    found = {}
    for kind in EVALS:
        path = checkpoint.parent / f"eval_{kind}" / f"eval_{kind}.json"
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(result, dict) and result.get("checkpoint") == str(checkpoint.resolve())
                and result.get("pretrain_epoch", epoch) == epoch and result.get("weights", weights) == weights
                and isinstance(result.get("top1" if kind == "knn" else "top1_best"), (int, float))):
            found[kind] = result
    return found


def _eval_line(kind: str, r: dict) -> str:
    if kind == "knn":
        return (f"| kNN ({r.get('mode')}, k={r.get('k')}) | {r['top1']:.2f} | {r['top5']:.2f} | "
                f"{r.get('val_images')} val images |")
    what = {"linear": f"linear ({r.get('protocol')})", "semi": f"semi-supervised ({r.get('subset_percent')}% labels)"}
    return (f"| {what[kind]} | {r['top1_best']:.2f} (best, epoch {r.get('best_epoch')}) | "
            f"{r.get('top5_at_best', float('nan')):.2f} | {r.get('epochs_done')} epochs |")


def model_card(meta: dict, cfg, evals: dict) -> str:
    arch, name = meta["arch"], f"{meta['method']}-{meta['arch']}"
    lines = ["---", "library_name: timm", "tags:", "- image-feature-extraction", "- timm", "- self-supervised",
             "- sslight-dali", "---", "", f"# {name} (self-supervised, sslight-dali)", "",
             f"A {arch} backbone pre-trained without labels by {meta['method'].upper()} with the `{meta['recipe']}` "
             f"view recipe (SSLight) for {meta['epoch']} epoch(s) ({meta['step']} steps) on `{Path(cfg.data.root).name}` "
             f"(format {cfg.data.format}, split {cfg.data.train_split}); the {meta['weights']} weights. Exported by "
             "`sslight export --format hf`.", "", "```python", "import timm",
             'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)  # or "hf-hub:USER/REPO"',
             "model.eval()  # images [B, 3, H, W] -> pooled features [B, %d]" % meta["feature_dim"],
             "cfg = timm.data.resolve_data_config({}, model=model)", "transform = timm.data.create_transform(**cfg)",
             "```", "",
             f"Preprocessing (the eval view): resize the shorter side to {cfg.eval.resize} (bicubic), centre crop "
             f"{cfg.eval.crop}, normalise with mean {meta['mean']} and std {meta['std']}.", ""]
    if evals:
        lines += ["## Evaluation (`sslight eval`, val split)", "", "| protocol | top-1 % | top-5 % | |",
                  "|---|---|---|---|"] + [_eval_line(k, r) for k, r in evals.items()] + [""]
    else:
        lines += ["No `sslight eval` results were found beside the checkpoint.", ""]
    return "\n".join(lines)


def _check_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: --format hf writes a folder, and this is a file")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if other:
            raise ExportError(f"--out {out}: the folder holds other files ({', '.join(other[:3])}); choose a new "
                              "or empty folder (an earlier hf export is replaced)")


def write_folder(out: Path, files: dict[str, bytes]) -> None:
    """All files into a temp folder beside `out`, then renamed into place (an existing `out` is swapped out)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write ({e.strerror or e})") from None
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.is_dir():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:
        if old.is_dir() and not out.exists():
            os.replace(old, out)  # put the earlier export back
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"--out {out}: cannot write ({e.strerror or e})") from None
    shutil.rmtree(old, ignore_errors=True)


def export_hf(checkpoint, out, weights: str = "student") -> dict:
    """Write the hub folder `out`; returns the sidecar (sslight.json)."""
    checkpoint, out = Path(checkpoint), Path(out)
    _check_folder(out)
    pre = load_backbone(checkpoint, weights)
    arch = pre.cfg.model.backbone
    meta = sidecar(pre, "hf", checkpoint, out)
    config = hub_config(pre.backbone, pre.cfg)
    files = {"model.safetensors": safetensors_bytes(exported_state(pre.backbone, arch, "timm"), arch),
             "config.json": (json.dumps(config, indent=2) + "\n").encode(),
             "README.md": model_card(meta, pre.cfg, eval_results(checkpoint, pre.epoch, weights)).encode(),
             "sslight.json": (json.dumps(meta, indent=2) + "\n").encode()}
    write_folder(out, files)
    return meta


def _export_state(path: Path) -> tuple[dict, str]:
    """(state dict, architecture) of an hf folder or a timm export file with its sidecar."""
    if path.is_dir():
        config, weights = path / "config.json", path / "model.safetensors"
        if not (config.is_file() and weights.is_file()):
            raise ExportError(f"{path}: a folder without config.json and model.safetensors: not an hf export")
        return require_safetensors().load_file(str(weights)), json.loads(config.read_text())["architecture"]
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    if meta.get("format") != "timm":
        raise ExportError(f"{path}: a --format {meta.get('format')} export; load_backbone reads training checkpoints, "
                          "timm exports and hf folders (README, 'Export and deploy', loads the others)")
    if path.suffix == ".safetensors":
        return require_safetensors().load_file(str(path)), meta["arch"]
    return torch.load(path, map_location="cpu", weights_only=True), meta["arch"]


def load_export(path, weights: str = "student") -> torch.nn.Module:
    """The backbone (eval mode, CPU) of a training checkpoint, a timm export (with its FILE.json) or an hf folder."""
    path = Path(path)
    if not path.is_dir() and not path.with_name(path.name + ".json").is_file():
        return load_backbone(path, weights).backbone  # a training checkpoint (or an imported reference one)
    state, arch = _export_state(path)
    model = build_backbone(arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ExportError(f"{path}: its weights do not fit {arch} "
                          f"({'missing' if missing else 'unexpected'} key {first!r})")
    return model.eval()
