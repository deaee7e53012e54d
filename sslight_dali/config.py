"""Typed configuration: defaults, YAML files, recipes and `key.sub=value` overrides.

A training config (configs/<method>/<backbone>_<variant>.yaml, by path or by the name
`<method>/<backbone>_<variant>`) is merged over the defaults below, and over the config its `_base`
key names, if any. It names a view-sampling recipe (pipelines/*.yaml, or a name) in `data.recipe`;
the recipe's contents are merged into the `recipe` section, so a resolved config is self-contained
and is what a run saves. Command-line overrides are applied last and may reach into the recipe
(`recipe.local.size=96`).

Every default lives in the dataclasses below, except each method's own section (`dino`, `swav`,
`moco`), which lives in the method's module and joins `Config` when the method registers
(sslight_dali/methods/registry.py). Validation is driven by the type annotations and by
`field(metadata=...)` ranges/choices, so a wrong key or value names itself.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .augment import knob_field, knobs
from .backbones import BACKBONES
from .data_formats import FORMATS

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def _range(lo=None, hi=None, **extra):
    return {"range": (lo, hi), **extra}


def setting(default, lo=None, hi=None, help=""):
    """A config field with an allowed range [lo, hi] (checked on load) and a help text."""
    return field(default=default, metadata={**_range(lo, hi), "help": help})


def setting_list(default, help=""):
    """A list-valued config field (a scalar given for it becomes a one-item list)."""
    return field(default_factory=lambda: list(default), metadata={"help": help})


_f, _list = setting, setting_list  # short names for the tables below


# --------------------------------------------------------------------------------------------
# View-sampling recipe (the paper's contribution, as data)
# --------------------------------------------------------------------------------------------
def _add_knobs(cls, scope: str, before: str | None = None, frozen: bool = False, kind: str | None = None):
    """Make `cls` a dataclass with the op table's knobs of `scope` (sslight_dali/augment.py) added to
    its own fields, before the field `before` (at the end if None). A per-view knob's default is the
    op table's for `kind` (global or local); without a kind it has none (ViewGroup, and the frozen
    ViewSpec, which gets no field metadata either)."""
    own = dict(cls.__annotations__)
    names = list(own)
    at = names.index(before) if before else len(names)
    added = knobs(scope)
    cls.__annotations__ = {**{n: own[n] for n in names[:at]}, **{k.name: k.type for k in added},
                           **{n: own[n] for n in names[at:]}}
    if not frozen:
        for k in added:
            setattr(cls, k.name, knob_field(k, kind))
    return dataclass(frozen=frozen)(cls)


class ViewGroup:
    """`count` crops of one resolution; the ops' per-view probabilities (blur_p, solarize_p, ...), one
    per view or one for all. No defaults (the kinds differ in all of them): build a GlobalViews or a
    LocalViews, or give every field."""
    count: int
    size: int
    scale: list[float]

    def per_view(self, values: list[float], name: str) -> list[float]:
        if len(values) == 1:
            return values * self.count
        if len(values) != self.count:
            raise ConfigError(f"{name} has {len(values)} entries but count is {self.count}: "
                              "give one per view or a single value")
        return list(values)


class Augment:
    """Settings shared by every view (reference: src/data/transforms.py:45-80): the crop's aspect ratios
    and resampling, each op's knobs (from the op table, sslight_dali/augment.py), the normalization."""
    ratio: list[float] = _list([3 / 4, 4 / 3], "RandomResizedCrop aspect-ratio range")
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: list[float] = _list(IMAGENET_MEAN)
    std: list[float] = _list(IMAGENET_STD)


class ViewSpec:
    """One output view: its group's geometry and, for each op with per-view probabilities, this view's
    (e.g. blur_p). The settings shared by all views are in `Recipe.augment`."""
    kind: Literal["global", "local"]
    index: int
    size: int
    scale: tuple

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index + 1}"


ViewGroup = _add_knobs(ViewGroup, "view")
Augment = _add_knobs(Augment, "augment", before="mean")
ViewSpec = _add_knobs(ViewSpec, "view", frozen=True)


_SIZE_HELP = "output side in pixels"
_SCALE_HELP = "RandomResizedCrop area fraction range [min, max]"


class GlobalViews(ViewGroup):
    """`recipe.global`: the SSLight global views, with the op table's global-view probabilities
    (blur [1.0, 0.1], solarize [0.0, 0.2]: view 1 always blurred, view 2 sometimes solarized)."""
    count: int = _f(2, 0, 64)
    size: int = _f(224, 8, 1024, _SIZE_HELP)
    scale: list[float] = _list([0.3, 1.0], _SCALE_HELP)


class LocalViews(ViewGroup):
    """`recipe.local`: the SSLight local views, with the op table's local-view probabilities (blur
    0.5, no solarize)."""
    count: int = _f(6, 0, 64)
    size: int = _f(128, 8, 1024, _SIZE_HELP)
    scale: list[float] = _list([0.05, 0.3], _SCALE_HELP)


GlobalViews = _add_knobs(GlobalViews, "view", kind="global")
LocalViews = _add_knobs(LocalViews, "view", kind="local")


@dataclass
class Recipe:
    name: str = "unnamed"
    global_: GlobalViews = field(default_factory=GlobalViews)
    local: LocalViews = field(default_factory=LocalViews)
    augment: Augment = field(default_factory=Augment)
    loss_weights: list[float] = _list([0.4, 0.6], "LAMBDAS: weight of mean(global-global) and "
                                      "mean(global-local) pair losses")

    def views(self) -> list["ViewSpec"]:
        """Every view in output order: [global 1, global 2, local 1..N]."""
        out = []
        for kind, group in (("global", self.global_), ("local", self.local)):
            probs = {k.name: group.per_view(getattr(group, k.name), f"recipe.{_yaml_key(kind)}.{k.name}")
                     for k in knobs("view")}
            for i in range(group.count):
                out.append(ViewSpec(kind=kind, index=i, size=group.size, scale=tuple(group.scale),
                                    **{name: p[i] for name, p in probs.items()}))
        return out


# --------------------------------------------------------------------------------------------
# Training config
# --------------------------------------------------------------------------------------------
@dataclass
class ModelCfg:
    backbone: str = field(default="resnet18", metadata={"choices": lambda: list(BACKBONES)})  # backbones.py
    drop_path_rate: float = _f(0.0, 0.0, 1.0, "student only (the reference uses 0.1 for ViT)")
    sync_bn: bool = True


@dataclass
class OptimCfg:
    name: Literal["lars", "adamw"] = "lars"
    base_lr: float = _f(0.48, 0.0, 100.0, "for a global batch of 256; peak = base_lr * global_batch / 256")
    min_lr: float = _f(0.0048, 0.0, 100.0, "absolute, not scaled")
    warmup_epochs: float = _f(10.0, 0.0)
    start_warmup_lr: float = _f(0.0, 0.0, 100.0, "absolute, not scaled")
    weight_decay: float = _f(1e-6, 0.0, 10.0)
    weight_decay_end: float = _f(1e-6, 0.0, 10.0)
    momentum: float = _f(0.9, 0.0, 1.0, "LARS momentum")
    lars_eta: float = _f(0.001, 0.0, 1.0)
    betas: list[float] = _list([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, 0.0, 1.0, "AdamW eps")
    clip_grad: float = _f(0.0, 0.0, help="per-parameter grad-norm clip (DINO style); 0 = off")


@dataclass
class TrainCfg:
    epochs: int = _f(200, 1)
    batch_size: int = _f(128, 1, help="per GPU/process; the reference runs 8 x 128 = 1024")
    reference_world_size: int = _f(0, 0, help="if > 0, scale LR as if the global batch were "
                                   "batch_size * this (reproduce 8-GPU schedules on fewer GPUs)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto", metadata={"help": "auto = bf16 on GPU, fp32 on CPU (bf16 with data.dtype=bfloat16); "
                                  "the reference trains fp32"})
    channels_last: bool = True
    compile: bool = field(default=False, metadata={"help": "torch.compile each backbone + head; the first step "
                                                   "compiles (start-up cost logged in train.log)"})
    joint_linear_probe: bool = True
    num_classes: int = _f(0, 0, help="0 = number of classes found in the dataset")
    log_every: int = _f(20, 1, help="steps between log lines; the only host syncs of the loop")
    tensorboard: bool = True
    checkpoint_every: int = _f(0, 0, help="steps between checkpoints; 0 = epoch ends only")
    keep_every_epochs: int = _f(20, 0, help="also keep an epoch-tagged copy this often; 0 = never")
    keep_last: int = _f(2, 1, help="step checkpoints kept (newest first); resume=auto falls back to an older one if the newest is damaged")
    overwrite: bool = field(default=False, metadata={
        "help": "a fresh run in an output_dir that holds checkpoints moves the old run aside to <dir>.old-<time> (never deletes); false = refuse"})
    dist_timeout_s: int = _f(1800, 10, help="seconds a collective waits for the other processes before the run stops (a dead rank)")
    max_steps: int = _f(0, 0, help="stop after this many steps in total (0 = run all epochs)")
    knn_every: int = _f(1, 0, help="epochs between kNN evaluations; 0 = never")
    output_dir: str = "runs/default"
    resume: str = field(default="", metadata={"help": "'' = fresh, 'auto' = latest in output_dir, or a path"})
    seed: int = _f(0, 0)
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
    num_threads: int = _f(4, 1, 256, help="DALI CPU threads / torchvision workers per process")
    prefetch: int = _f(2, 1, 16, help="DALI prefetch queue depth")
    pipelines: int | Literal["auto"] = _f("auto", 1, 16, help=(
        "DALI training pipelines per process, taking turns batch by batch, each with num_threads/pipelines threads: "
        "fills the cores DALI's one-operator-at-a-time CPU execution leaves idle. auto = 1 where the DALI pipeline "
        "runs on the GPU (its operators are GPU kernels); on the CPU 2 when data.num_threads >= 2 (what `sslight "
        "bench tune` found best on a 2-core node) and each pipeline gets a full batch, else 1; a resumed run "
        "keeps its checkpoint's count. The run's "
        "config.yaml and bench records show the count used; `sslight bench tune` sweeps it"))
    hw_decoder_load: float = _f(0.65, 0.0, 1.0, "share of JPEGs sent to the hardware decoder (A100/H100)")
    skip_bad_files: bool = field(default=False, metadata={"help": "exclude undecodable files up front (counted and logged) instead of failing"})
    verify_cache: str = field(default="auto", metadata={
        "help": "where the up-front file check keeps its verdict, keyed by every file's path, size and mtime "
                "(auto = $XDG_CACHE_HOME/sslight-dali/verified or ~/.cache/...; '' = read every file at every start)"})
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_image_pixels: int = _f(89478485, 0, help="PIL's decompression-bomb limit (pixels; refused above twice "
                               "this); 0 = no limit. Raise it for very large images")


@dataclass
class LinearEvalCfg:
    """`sslight eval linear`: the reference's linear protocol, or a quick probe on cached features."""
    protocol: Literal["reference", "fast"] = field(default="reference", metadata={
        "help": "reference = the paper's (augmented crops, frozen backbone in eval mode, LR stepped per epoch); "
                "fast = centre-crop features extracted once, linear layer on the cached features (NOT the paper's)"})
    epochs: int = _f(100, 1)
    lr: float = _f(0.0, 0.0, None, "reference: peak LR at global batch 4096 (CNN, LARS) / 1024 (ViT, SGD), "
                   "scaled by the actual global batch; fast: the AdamW LR; 0 = default (0.8 / 0.04; fast 1e-3)")
    batch_size: int = _f(0, 0, help="per process; 0 = the reference's per-GPU batch (512 CNN, 128 ViT; fast 256)")


@dataclass
class SemiEvalCfg:
    """`sslight eval semi`: full fine-tuning on a labelled subset of the train split."""
    epochs: int = _f(0, 0, help="0 = the reference's: 60 for a 1% subset, 30 for 10% (a file: by its size)")
    lr: float = _f(0.12, 0.0, None, "peak LR at global batch 1024, scaled by the actual global batch")
    batch_size: int = _f(128, 1, help="per process; the reference runs 8 x 128 = 1024")
    use_head: bool = field(default=True, metadata={
        "help": "start the 3-layer MLP head from the DINO projection head's first two Linear+BN layers"})
    seed: int = _f(0, 0, help="seed of the per-class subset drawn for --subset 1|10")


@dataclass
class EvalCfg:
    knn_k: int = _f(20, 1)
    knn_t: float = _f(0.07, 1e-4, 10.0)
    batch_size: int = _f(128, 1)
    resize: int = _f(256, 8)
    crop: int = _f(224, 8)
    knn_mode: Literal["val_loo", "train_val"] = field(default="val_loo", metadata={
        "help": "val_loo = the reference's monitor (leave-one-out on val); train_val = train bank, val queries"})
    linear: LinearEvalCfg = field(default_factory=LinearEvalCfg)
    semi: SemiEvalCfg = field(default_factory=SemiEvalCfg)


def method_sections() -> dict[str, type]:
    """{method name: its config-section dataclass}, from the method registry. Importing the methods
    package registers the built-in methods (it needs torch, so it happens only when a config is built)."""
    from .methods.registry import METHODS
    return {name: m.config for name, m in METHODS.items()}


@dataclass
class Config:
    """The whole run. After `model` comes one section per registered method (`dino`, `swav`, `moco`:
    their dataclasses live in sslight_dali/methods/), added by `_sync_method_sections`."""
    method: str = field(default="dino", metadata={"choices": lambda: list(method_sections())})
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    data: DataCfg = field(default_factory=DataCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self):
        _sync_method_sections()

    def __getattr__(self, name: str):
        # Only for a section missing from an instance made before its method registered: its defaults.
        section = method_sections().get(name)
        if section is None:
            raise AttributeError(f"'Config' object has no attribute {name!r}")
        setattr(self, name, section())
        return self.__dict__[name]

    def to_dict(self) -> dict:
        return to_dict(self)


def _sync_method_sections() -> bool:
    """Give Config one field per registered method, in place (so every `from .config import Config`
    sees it), when the registry has changed. True if Config was changed."""
    sections = method_sections()
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if [(n, f.type) for n, f in fields.items() if n not in FIXED_FIELDS] == list(sections.items()):
        return False
    fixed = [(n, fields[n].type, fields[n]) for n in FIXED_FIELDS]
    order = fixed[:2] + [(n, cls, field(default_factory=cls)) for n, cls in sections.items()] + fixed[2:]
    # Re-run @dataclass on the same class: drop what it generated and give it the fields again.
    for attr in ("__init__", "__repr__", "__eq__", "__match_args__", "__replace__"):
        if attr in Config.__dict__:
            delattr(Config, attr)
    Config.__annotations__ = {n: tp for n, tp, _ in order}
    for n, _, f in order:
        setattr(Config, n, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
    dataclass(Config)
    _HINTS.pop(Config, None)
    return True


# Config's own fields; the method sections go after `model`. A method cannot take one of these names.
FIXED_FIELDS = ("method", "model", "optim", "train", "data", "eval", "recipe")


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with validation
# --------------------------------------------------------------------------------------------
def _yaml_key(name: str) -> str:
    # `global` is a Python keyword, so the field is `global_`; YAML and overrides say `global`.
    return name.rstrip("_")


def _fields(cls) -> dict[str, dataclasses.Field]:
    if cls is Config:
        _sync_method_sections()
    return {_yaml_key(f.name): f for f in dataclasses.fields(cls)}


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_yaml_key(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    for name, f in _fields(cls).items():
        t = _resolved_type(cls, f)
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


_HINTS: dict = {}


def _resolved_type(cls, f):
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
    if origin is Literal or "choices" in meta:
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


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a (partial) dict; unknown keys and bad values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{path}{key}'{_suggest(key, fields)}")
        f = fields[key]
        tp = _resolved_type(cls, f)
        if dataclasses.is_dataclass(tp):
            # A partial section overrides the field's own default instance, not the class defaults.
            default = to_dict(f.default_factory()) if f.default_factory is not dataclasses.MISSING else {}
            merged = _deep_merge(default, value) if isinstance(value, dict) else value
            kwargs[f.name] = from_dict(tp, merged, f"{path}{key}.")
        else:
            kwargs[f.name] = _check_value(f"{path}{key}", value, tp, f.metadata)
    return cls(**kwargs)


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
    raise ConfigError(f"config file not found: {ref}{_suggest(name, shipped_names(kind))}")


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


def expand_key(key: str) -> str:
    """Full dotted key; a bare leaf name (`resume`, `epochs`) is accepted when it is unambiguous."""
    valid = _all_keys(Config)
    if key in valid:
        return key
    if "." not in key:
        matches = [k for k in valid if k.endswith("." + key)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ConfigError(f"key '{key}' is ambiguous: use one of {matches}")
    raise ConfigError(f"unknown key '{key}'{_suggest(key, valid)}")


def _set_dotted(data: dict, key: str, value) -> None:
    key = expand_key(key)
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- config YAML (over its `_base`) <- its recipe YAML (over its `_base`) <- command-line
    overrides. `path` and `data.recipe` are paths or shipped names (see find_file)."""
    data: dict = {}
    cfg_dir = None
    if path is not None:
        data, found = read_chain(path, "configs")
        cfg_dir = found.resolve().parent
    parsed = parse_overrides(list(overrides))
    for key, value in parsed:
        if expand_key(key) == "data.recipe":
            data.setdefault("data", {})["recipe"] = value
    recipe_ref = data.get("data", {}).get("recipe", DataCfg.recipe)
    if any(expand_key(k) == "data.recipe" for k, _ in parsed):
        data.pop("recipe", None)  # a new recipe file replaces the one embedded in a saved config
    if "recipe" not in data and recipe_ref:
        try:
            data["recipe"], _ = read_chain(recipe_ref, "pipelines", cfg_dir)
        except ConfigError as e:
            raise ConfigError(f"{path or 'defaults'}: data.recipe: {e}") from None
    for key, value in parsed:
        _set_dotted(data, key, value)
    for key, value in parsed:  # a bad override is the command line's fault, not the file's
        alone: dict = {}
        _set_dotted(alone, key, value)
        try:
            from_dict(Config, alone)
        except ConfigError as e:
            raise ConfigError(f"override {key}={value!r}: {e}") from None
    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that the types alone cannot express."""
    r = cfg.recipe
    r.views()
    for name, pair in (("recipe.global.scale", r.global_.scale), ("recipe.local.scale", r.local.scale),
                       ("recipe.augment.ratio", r.augment.ratio), ("recipe.augment.blur_sigma", r.augment.blur_sigma)):
        if len(pair) != 2 or not (0 < pair[0] <= pair[1]):
            raise ConfigError(f"{name}: expected [min, max] with 0 < min <= max, got {pair}")
    if r.global_.count < 1:
        raise ConfigError("recipe.global.count: at least one global view is needed")
    from .methods.registry import method_class
    method_class(cfg.method).check_config(cfg)
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
    """YAML of the resolved config; the sections of the methods not in use are left out."""
    others = set(method_sections()) - {cfg.method}
    d = {k: v for k, v in cfg.to_dict().items() if k not in others}
    return yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from .files import atomic_write
    atomic_write(path, dump_config(cfg))
