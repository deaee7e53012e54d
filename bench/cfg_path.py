"""The path of `cfg` through the package during `train(cfg)`: the measure of issue #20 ("the modules a
value passes through and the returns to a module already left"). Not a test; run it by hand:

    PYTHONPATH=$PWD python bench/cfg_path.py

Method: a one-step CPU run (fresh, no resume) of the tiny DINO ResNet18 config under sys.setprofile.
A *stop* is a function of sslight_dali that receives, as an argument,
  A: the Config object itself (by identity), or
  B: the Config object or an object holding it as `.cfg` (a Trainer's `self`, an eval `Run`);
each counted once, at its first call. The stops, in first-call order, give a sequence of modules; a
*return* is a stop whose module differs from the previous stop's and was visited before. Printed for
A and B: the sequence, stops, distinct modules, returns.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _holds(obj, cfg) -> bool:
    try:
        return getattr(obj, "cfg", None) is cfg
    except Exception:  # an object whose attribute lookup fails counts as not holding it
        return False


def trace(cfg, run) -> dict[str, list[tuple[str, str]]]:
    pkg = str(REPO / "sslight_dali")
    seen, stops = {"A": set(), "B": set()}, {"A": [], "B": []}

    def profile(frame, event, arg):
        code = frame.f_code
        if event != "call" or code in seen["B"] or not code.co_filename.startswith(pkg):
            return
        args = [frame.f_locals.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
        stop = (frame.f_globals.get("__name__", "?"), code.co_qualname)
        if any(a is cfg for a in args) and code not in seen["A"]:
            seen["A"].add(code)
            stops["A"].append(stop)
        if any(a is cfg or _holds(a, cfg) for a in args):
            seen["B"].add(code)
            stops["B"].append(stop)

    sys.setprofile(profile)
    try:
        run(cfg)
    finally:
        sys.setprofile(None)
    return stops


def summary(stops: list[tuple[str, str]]) -> tuple[int, int, int]:
    modules, returns, prev = [], 0, None
    for module, _ in stops:
        if module != prev and module in modules:
            returns += 1
        if module not in modules:
            modules.append(module)
        prev = module
    return len(stops), len(modules), returns


def main() -> None:
    import torch
    try:
        from sslight_dali.run_config import load_config
    except ImportError:  # the code before run_config.py (to measure it too)
        from sslight_dali.config import load_config
    from sslight_dali.synth import synth_dataset
    from sslight_dali.train import train
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="cfg-path-"))
    synth_dataset(tmp / "data", classes=4, per_class=8, val_per_class=4, min_side=40, max_side=64)
    cfg = load_config(REPO / "configs/dino/resnet18_sslight.yaml", [
        "recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=4",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.num_threads=1",
        "train.knn_every=0", "train.device=cpu", "data.device=cpu", "train.tensorboard=false",
        "train.max_steps=1", f"data.root={tmp / 'data'}", f"train.output_dir={tmp / 'run'}"])
    for name, stops in trace(cfg, train).items():
        print(f"{name}:")
        for module, function in stops:
            print(f"  {module}.{function}")
        print("{}: stops {}, modules {}, returns to a module already left {}".format(name, *summary(stops)))


if __name__ == "__main__":
    main()
