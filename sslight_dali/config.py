"""Typed configuration: defaults, YAML files, recipes and `key.sub=value` overrides.

A training config (configs/<method>/<backbone>_<variant>.yaml, by path or by the name
`<method>/<backbone>_<variant>`) is merged over the defaults below, and over the config its `_base`
key names, if any. It names a view-sampling recipe (pipelines/*.yaml, or a name) in `data.recipe`;
the recipe's contents are merged into the `recipe` section, so a resolved config is self-contained
and is what a run saves. Command-line overrides are applied last and may reach into the recipe
(`recipe.local.size=96`).

Every field is declared in a dataclass: the sections every run has in `Config` below, the ops' knobs
in sslight_dali/augment.py (composed into `Augment` and `ViewGroup` by inheritance), and each method's
own section (`dino`, `swav`, `moco`) in the method's module, with a `Config` subclass that holds it
(DinoConfig). Loading picks that subclass by the `method` key (run_config.py, above the method
registry). Validation is driven by the type annotations and by `field(metadata=...)` ranges/choices,
so a wrong key or value names itself.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from .augment import OpKnobs, ViewOpKnobs
from .backbones import BACKBONES
from .data_formats import FORMATS
from .files import atomic_write
from .settings import ConfigError, setting, setting_list

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------------------------
# View-sampling recipe (the paper's contribution, as data)
# --------------------------------------------------------------------------------------------
@dataclass
class ViewGeometry:
    count: int
    size: int
    scale: list[float]


@dataclass
class ViewGroup(ViewOpKnobs, ViewGeometry):
    """`count` crops of one resolution; the ops' per-view probabilities (blur_p, solarize_p, ...,
    from augment.ViewOpKnobs), one per view or one for all. No defaults (the kinds differ in all of
    them): build a GlobalViews or a LocalViews, or give every field."""

    def per_view(self, values: list[float], name: str) -> list[float]:
        if len(values) == 1:
            return values * self.count
        if len(values) != self.count:
            raise ConfigError(f"{name} has {len(values)} entries but count is {self.count}: "
                              "give one per view or a single value")
        return list(values)


@dataclass
class CropSettings:
    ratio: list[float] = setting_list([3 / 4, 4 / 3], "RandomResizedCrop aspect-ratio range")
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@dataclass
class Augment(OpKnobs, CropSettings):
    """Settings shared by every view (reference: src/data/transforms.py:45-80), in this order: the
    crop's aspect ratios and resampling, each op's knobs (augment.OpKnobs), the normalization."""
    mean: list[float] = setting_list(IMAGENET_MEAN)
    std: list[float] = setting_list(IMAGENET_STD)


@dataclass(frozen=True)
class ViewSpec:
    """One output view: its group's geometry and this view's value of each per-view probability list
    (augment.ViewOpKnobs: test_augment_table checks that the two agree). The settings shared by all
    views are in `Recipe.augment`."""
    kind: Literal["global", "local"]
    index: int
    size: int
    scale: tuple
    blur_p: float
    solarize_p: float

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index + 1}"


_SIZE_HELP = "output side in pixels"
_SCALE_HELP = "RandomResizedCrop area fraction range [min, max]"


@dataclass
class GlobalViews(ViewGroup):
    """`recipe.global`: the SSLight global views, with their per-view probabilities (blur [1.0, 0.1],
    solarize [0.0, 0.2]: view 1 always blurred, view 2 sometimes solarized)."""
    count: int = setting(2, 0, 64)
    size: int = setting(224, 8, 1024, _SIZE_HELP)
    scale: list[float] = setting_list([0.3, 1.0], _SCALE_HELP)
    blur_p: list[float] = setting_list([1.0, 0.1])
    solarize_p: list[float] = setting_list([0.0, 0.2])


@dataclass
class LocalViews(ViewGroup):
    """`recipe.local`: the SSLight local views, with their per-view probabilities (blur 0.5, no
    solarize)."""
    count: int = setting(6, 0, 64)
    size: int = setting(128, 8, 1024, _SIZE_HELP)
    scale: list[float] = setting_list([0.05, 0.3], _SCALE_HELP)
    blur_p: list[float] = setting_list([0.5])
    solarize_p: list[float] = setting_list([0.0])


@dataclass
class Recipe:
    name: str = "unnamed"
    global_: GlobalViews = field(default_factory=GlobalViews)
    local: LocalViews = field(default_factory=LocalViews)
    augment: Augment = field(default_factory=Augment)
    loss_weights: list[float] = setting_list([0.4, 0.6], "LAMBDAS: weight of mean(global-global) and "
                                             "mean(global-local) pair losses")

    def views(self) -> list[ViewSpec]:
        """Every view in output order: [global 1, global 2, local 1..N]."""
        out = []
        kinds: list[tuple[Literal["global", "local"], ViewGroup]] = [("global", self.global_), ("local", self.local)]
        for kind, group in kinds:
            probs = {f.name: group.per_view(getattr(group, f.name), f"recipe.{kind}.{f.name}")
                     for f in dataclasses.fields(ViewOpKnobs)}
            for i in range(group.count):
                per_view: dict[str, Any] = {name: p[i] for name, p in probs.items()}
                out.append(ViewSpec(kind=kind, index=i, size=group.size, scale=tuple(group.scale), **per_view))
        return out


# --------------------------------------------------------------------------------------------
# Training config
# --------------------------------------------------------------------------------------------
@dataclass
class ModelCfg:
    backbone: str = field(default="resnet18", metadata={"choices": lambda: list(BACKBONES)})  # backbones.py
    drop_path_rate: float = setting(0.0, 0.0, 1.0, "student only (the reference uses 0.1 for ViT)")
    sync_bn: bool = True


@dataclass
class OptimCfg:
    name: Literal["lars", "adamw"] = "lars"
    base_lr: float = setting(0.48, 0.0, 100.0, "for a global batch of 256; peak = base_lr * global_batch / 256")
    min_lr: float = setting(0.0048, 0.0, 100.0, "absolute, not scaled")
    warmup_epochs: float = setting(10.0, 0.0)
    start_warmup_lr: float = setting(0.0, 0.0, 100.0, "absolute, not scaled")
    weight_decay: float = setting(1e-6, 0.0, 10.0)
    weight_decay_end: float = setting(1e-6, 0.0, 10.0)
    momentum: float = setting(0.9, 0.0, 1.0, "LARS momentum")
    lars_eta: float = setting(0.001, 0.0, 1.0)
    betas: list[float] = setting_list([0.9, 0.999], "AdamW betas")
    eps: float = setting(1e-8, 0.0, 1.0, "AdamW eps")
    clip_grad: float = setting(0.0, 0.0, help="per-parameter grad-norm clip (DINO style); 0 = off")


@dataclass
class TrainCfg:
    epochs: int = setting(200, 1)
    batch_size: int = setting(128, 1, help="per GPU/process; the reference runs 8 x 128 = 1024")
    reference_world_size: int = setting(0, 0, help="if > 0, scale LR as if the global batch were "
                                   "batch_size * this (reproduce 8-GPU schedules on fewer GPUs)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto", metadata={"help": "auto = bf16 on GPU, fp32 on CPU (bf16 with data.dtype=bfloat16); "
                                  "the reference trains fp32"})
    channels_last: bool = True
    compile: bool = field(default=False, metadata={"help": "torch.compile each backbone + head; the first step "
                                                   "compiles (start-up cost logged in train.log)"})
    joint_linear_probe: bool = True
    num_classes: int = setting(0, 0, help="0 = number of classes found in the dataset")
    log_every: int = setting(20, 1, help="steps between log lines; the only host syncs of the loop")
    tensorboard: bool = True
    checkpoint_every: int = setting(0, 0, help="steps between checkpoints; 0 = epoch ends only")
    keep_every_epochs: int = setting(20, 0, help="also keep an epoch-tagged copy this often; 0 = never")
    keep_last: int = setting(2, 1, help="step checkpoints kept (newest first); resume=auto falls back to an older one if the newest is damaged")
    overwrite: bool = field(default=False, metadata={
        "help": "a fresh run in an output_dir that holds checkpoints moves the old run aside to <dir>.old-<time> (never deletes); false = refuse"})
    dist_timeout_s: int = setting(1800, 10, help="seconds a collective waits for the other processes before the run stops (a dead rank)")
    max_steps: int = setting(0, 0, help="stop after this many steps in total (0 = run all epochs)")
    knn_every: int = setting(1, 0, help="epochs between kNN evaluations; 0 = never")
    output_dir: str = "runs/default"
    resume: str = field(default="", metadata={"help": "'' = fresh, 'auto' = latest in output_dir, or a path"})
    seed: int = setting(0, 0)
    device: Literal["auto", "gpu", "cpu"] = field(default="auto", metadata={
        "help": "where the model runs; auto = the GPU if there is one", "aliases": {"cuda": "gpu"}})


@dataclass
class DataCfg:
    root: str = field(default="", metadata={"help": "dataset root holding train/ and val/; '' = embedded synthetic data"})
    format: str = field(default="imagefolder", metadata={"choices": lambda: list(FORMATS), "help": (
        "how a split is stored: an entry of the data-format table (data_formats.py): imagefolder (<split>/<class>/*; "
        "a split of images without class folders is read as folder), folder (unlabeled images anywhere under "
        "<split>/ or the root), filelist, webdataset")})
    train_split: str = "train"
    val_split: str = "val"
    recipe: str = field(default="pipelines/cnn_sslight.yaml", metadata={
        "help": "a recipe YAML path, or a shipped recipe's name (cnn_sslight)"})
    backend: Literal["dali", "torchvision"] = "dali"
    device: Literal["auto", "gpu", "cpu"] = field(default="auto", metadata={
        "help": "where view sampling runs; auto = the GPU if there is one", "aliases": {"cuda": "gpu"}})
    num_threads: int = setting(4, 1, 256, help="DALI CPU threads / torchvision workers per process")
    prefetch: int = setting(2, 1, 16, help="DALI prefetch queue depth")
    pipelines: int | Literal["auto"] = setting("auto", 1, 16, help=(
        "DALI training pipelines per process, taking turns batch by batch, each with num_threads/pipelines threads: "
        "fills the cores DALI's one-operator-at-a-time CPU execution leaves idle. auto = 1 where the DALI pipeline "
        "runs on the GPU (its operators are GPU kernels); on the CPU 2 when data.num_threads >= 2 (what `sslight "
        "bench tune` found best on a 2-core node) and each pipeline gets a full batch, else 1; a resumed run "
        "keeps its checkpoint's count. The run's "
        "config.yaml and bench records show the count used; `sslight bench tune` sweeps it"))
    hw_decoder_load: float = setting(0.65, 0.0, 1.0, "share of JPEGs sent to the hardware decoder (A100/H100)")
    skip_bad_files: bool = field(default=False, metadata={"help": "exclude undecodable files up front (counted and logged) instead of failing"})
    verify_cache: str = field(default="auto", metadata={
        "help": "where the up-front file check keeps its verdict, keyed by every file's path, size and mtime "
                "(auto = $XDG_CACHE_HOME/sslight-dali/verified or ~/.cache/...; '' = read every file at every start)"})
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_image_pixels: int = setting(89478485, 0, help="PIL's decompression-bomb limit (pixels; refused above twice "
                               "this); 0 = no limit. Raise it for very large images")


@dataclass
class LinearEvalCfg:
    """`sslight eval linear`: the reference's linear protocol, or a quick probe on cached features."""
    protocol: Literal["reference", "fast"] = field(default="reference", metadata={
        "help": "reference = the paper's (augmented crops, frozen backbone in eval mode, LR stepped per epoch); "
                "fast = centre-crop features extracted once, linear layer on the cached features (NOT the paper's)"})
    epochs: int = setting(100, 1)
    lr: float = setting(0.0, 0.0, None, "reference: peak LR at global batch 4096 (CNN, LARS) / 1024 (ViT, SGD), "
                   "scaled by the actual global batch; fast: the AdamW LR; 0 = default (0.8 / 0.04; fast 1e-3)")
    batch_size: int = setting(0, 0, help="per process; 0 = the reference's per-GPU batch (512 CNN, 128 ViT; fast 256)")


@dataclass
class SemiEvalCfg:
    """`sslight eval semi`: full fine-tuning on a labelled subset of the train split."""
    epochs: int = setting(0, 0, help="0 = the reference's: 60 for a 1% subset, 30 for 10% (a file: by its size)")
    lr: float = setting(0.12, 0.0, None, "peak LR at global batch 1024, scaled by the actual global batch")
    batch_size: int = setting(128, 1, help="per process; the reference runs 8 x 128 = 1024")
    use_head: bool = field(default=True, metadata={
        "help": "start the 3-layer MLP head from the DINO projection head's first two Linear+BN layers"})
    seed: int = setting(0, 0, help="seed of the per-class subset drawn for --subset 1|10")


@dataclass
class EvalCfg:
    knn_k: int = setting(20, 1)
    knn_t: float = setting(0.07, 1e-4, 10.0)
    batch_size: int = setting(128, 1)
    resize: int = setting(256, 8)
    crop: int = setting(224, 8)
    knn_mode: Literal["val_loo", "train_val"] = field(default="val_loo", metadata={
        "help": "val_loo = the reference's monitor (leave-one-out on val); train_val = train bank, val queries"})
    linear: LinearEvalCfg = field(default_factory=LinearEvalCfg)
    semi: SemiEvalCfg = field(default_factory=SemiEvalCfg)


@dataclass
class Config:
    """The sections every run has. A method's module adds its own section in a subclass (methods/dino.py:
    `DinoConfig(Config)` with `method = "dino"` and `dino: DinoCfg`), registered with the method;
    run_config.load_config builds the subclass that `method` names."""
    method: str = field(default="dino", metadata={"help": "a registered method (methods/registry.py); built in: dino, swav, moco"})
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    data: DataCfg = field(default_factory=DataCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    recipe: Recipe = field(default_factory=Recipe)

    def to_dict(self) -> dict:
        return to_dict(self)


# Config's own fields; a method cannot take one of these names for its section.
FIXED_FIELDS = tuple(f.name for f in dataclasses.fields(Config))


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with validation
# --------------------------------------------------------------------------------------------
def _yaml_key(name: str) -> str:
    # `global` is a Python keyword, so the field is `global_`; YAML and overrides say `global`.
    return name.rstrip("_")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    """{YAML key: field} in the order `config show` prints them: a method's section (the field a Config
    subclass adds) right after `model`."""
    fields = list(dataclasses.fields(cls))
    if issubclass(cls, Config):
        at = FIXED_FIELDS.index("model") + 1
        fields = fields[:at] + fields[len(FIXED_FIELDS):] + fields[at:len(FIXED_FIELDS)]
    return {_yaml_key(f.name): f for f in fields}


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {key: to_dict(getattr(obj, f.name)) for key, f in _fields(type(obj)).items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass `cls`, in `config show` order."""
    keys = []
    for name, f in _fields(cls).items():
        t = _resolved_type(cls, f)
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            keys += all_keys(t, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


_HINTS: dict[type, dict[str, Any]] = {}


def _resolved_type(cls: type, f: dataclasses.Field) -> Any:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls][f.name]


def _check_value(path: str, value, tp, meta):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # a number or a word (data.pipelines: int | Literal["auto"])
        words = [w for arm in typing.get_args(tp) if typing.get_origin(arm) is Literal for w in typing.get_args(arm)]
        (number,) = [arm for arm in typing.get_args(tp) if typing.get_origin(arm) is not Literal]
        if isinstance(value, str):
            if value not in words:
                raise ConfigError(f"{path}: {value!r} is not allowed; give a number or one of {words}")
            return value
        return _check_value(path, value, number, meta)
    if origin is Literal or "choices" in meta:  # choices: a table's names (model.backbone: backbones.py)
        allowed = meta["choices"]() if "choices" in meta else typing.get_args(tp)
        # An old spelling still read (train.device: cuda, from before devices were named gpu/cpu).
        value = meta.get("aliases", {}).get(value, value) if isinstance(value, str) else value
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_check_value(f"{path}[{i}]", v, item_tp, meta) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-6` (no dot) as a string; accept it as the number it plainly is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # YAML reads `output_dir: 2024` as a number; a path or name is meant
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    lo, hi = meta.get("range", (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{path}: {value!r} is out of range; allowed [{lo}, {hi if hi is not None else 'inf'}]")
    return value


T = TypeVar("T")


def from_dict(cls: type[T], data: Any, path: str = "", others: dict[str, type] | None = None) -> T:
    """Build dataclass `cls` from a (partial) dict; unknown keys and bad values raise ConfigError.
    `others`: sections that may appear beside cls's own, each checked against its dataclass and then
    dropped (the other methods' sections, in a config or checkpoint that holds every method's)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = _fields(cls)
    others = others or {}
    kwargs = {}
    for key, value in data.items():
        if key in others:
            _section(others[key], others[key](), value, f"{path}{key}.")
            continue
        if key not in fields:
            raise ConfigError(f"unknown key '{path}{key}'{suggest(key, [*fields, *others])}")
        f = fields[key]
        tp = _resolved_type(cls, f)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            kwargs[f.name] = _section(tp, default, value, f"{path}{key}.")
        else:
            kwargs[f.name] = _check_value(f"{path}{key}", value, tp, f.metadata)
    return cls(**kwargs)


def _section(tp: type, default: Any, value: Any, path: str) -> Any:
    # A partial section overrides the field's own default instance, not the class defaults.
    merged = _deep_merge(to_dict(default) if default is not None else {}, value) if isinstance(value, dict) else value
    return from_dict(tp, merged, path)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def shipped_dir(kind: str) -> Path:
    """The folder of the shipped configs (kind "configs") or recipes ("pipelines"): inside the
    installed package (setup.py puts them there), else at the root of a source checkout."""
    for d in (PACKAGE_DIR / kind, REPO_ROOT / kind):
        if d.is_dir():
            return d
    return PACKAGE_DIR / kind


def shipped_names(kind: str) -> list[str]:
    d = shipped_dir(kind)
    return sorted(p.relative_to(d).with_suffix("").as_posix() for p in d.rglob("*.yaml"))


def find_file(ref: str | os.PathLike, kind: str, relative_to: Path | None = None) -> Path:
    """A config or recipe given by path or by shipped name (`dino/resnet18_sslight`, `cnn_sslight`).

    A relative path is tried against `relative_to` (the folder of the file that names it), the CWD and
    the repository root. Anything else is a shipped name, with an optional leading `configs/` or
    `pipelines/` and `.yaml`: so the repository paths (`configs/dino/resnet18_sslight.yaml`) work from
    any folder and in an installed package."""
    cand = Path(ref).expanduser()
    bases = [None] if cand.is_absolute() else [relative_to, Path.cwd(), REPO_ROOT]
    for base in bases:
        p = cand if base is None else base / cand
        if p.is_file():
            return p
    name = cand.as_posix().removeprefix(f"{kind}/").removesuffix(".yaml")
    shipped = shipped_dir(kind) / f"{name}.yaml"
    if not cand.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {ref}{suggest(name, shipped_names(kind))}")


def read_chain(ref: str | os.PathLike, kind: str, relative_to: Path | None = None, _seen=()) -> tuple[dict, Path]:
    """(contents, path) of a config or recipe file merged over the file(s) its `_base` key names."""
    path = find_file(ref, kind, relative_to)
    data = read_yaml(path)
    bases = data.pop("_base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base: expected a name or path, or a list of them, got {bases!r}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: _base: the chain of bases comes back to this file")
    merged: dict = {}
    for base in bases:  # a later base wins over an earlier one, the file over all of them
        try:
            merged = _deep_merge(merged, read_chain(base, kind, path.parent, (*_seen, path.resolve()))[0])
        except ConfigError as e:
            raise ConfigError(f"{path}: _base: {e}") from None
    return _deep_merge(merged, data), path


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def validate(cfg: Config) -> None:
    """Cross-field checks of the sections every run has, that the types alone cannot express (the
    method's own: run_config.validate)."""
    r = cfg.recipe
    r.views()
    for name, pair in (("recipe.global.scale", r.global_.scale), ("recipe.local.scale", r.local.scale),
                       ("recipe.augment.ratio", r.augment.ratio), ("recipe.augment.blur_sigma", r.augment.blur_sigma)):
        if len(pair) != 2 or not (0 < pair[0] <= pair[1]):
            raise ConfigError(f"{name}: expected [min, max] with 0 < min <= max, got {pair}")
    if r.global_.count < 1:
        raise ConfigError("recipe.global.count: at least one global view is needed")
    if len(r.loss_weights) != 2:
        raise ConfigError("recipe.loss_weights: expected [global-global weight, global-local weight]")
    if len(r.augment.mean) != 3 or len(r.augment.std) != 3:
        raise ConfigError("recipe.augment.mean/std: expected 3 values each")
    if cfg.optim.name == "adamw" and len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas: expected two values")
    if cfg.data.dtype == "bfloat16" and cfg.train.precision == "fp32":
        raise ConfigError("data.dtype=bfloat16 needs train.precision=bf16, fp16 or auto (an fp32 network refuses "
                          "bfloat16 images): set data.dtype=float32 or change train.precision")


class _Dumper(yaml.SafeDumper):
    pass


def _represent_list(dumper, data):
    # Short lists of scalars (scales, betas, per-view probabilities) read best inline.
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_config(cfg: Config) -> str:
    """YAML of the resolved config (its method's section only: the others are not part of it)."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write(path, dump_config(cfg))
