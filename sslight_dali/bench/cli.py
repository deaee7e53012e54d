"""`sslight bench` command line: the subcommands and flags, and what each writes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .plots import plot_compare, plot_profile, plot_sweep, plot_tune, report
from .runs import run_one, write_json
from .sweeps import run_compare, run_profile, run_sweep
from .timing import BenchError
from .tune import add_tune_arguments, run_tune

COMMANDS = ("pipeline", "model", "train", "compare", "tune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    helps = {"pipeline": "view sampling alone: decode + all views of the recipe",
             "model": "training steps on synthetic device tensors (compute ceiling)",
             "train": "training steps on the real pipeline, beside `model` (ratio, data-wait)",
             "compare": "several backends/devices side by side: table, ratios, JSON, PNG",
             "tune": "the fastest threads / prefetch / hardware-decoder share (/ batch size) on this node, "
                     "one knob at a time; prints them as overrides"}
    for name in COMMANDS:
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("config", help="training config, e.g. configs/dino/resnet18_sslight.yaml")
        p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (after the config)")
        g = p.add_argument_group("data and loader knobs (shortcuts for data.* / train.* overrides)")
        g.add_argument("--backend", choices=["dali", "torchvision"])
        g.add_argument("--device", choices=["auto", "gpu", "cpu"], help="where view sampling runs")
        g.add_argument("--threads", type=int, help="DALI CPU threads / torchvision workers")
        g.add_argument("--prefetch", type=int, help="DALI prefetch queue depth")
        g.add_argument("--hw-decoder-load", type=float, help="share of JPEGs for the hardware decoder")
        g.add_argument("--batch-size", type=int)
        g.add_argument("--data", help="ImageFolder root with train/ (default: synthetic set in data/bench_synth)")
        g.add_argument("--compile", action="store_const", const="true", help="train.compile=true (model, train)")
        t = p.add_argument_group("measurement")
        t.add_argument("--repeats", type=int, default=5, help="timed runs; the figure is their median")
        t.add_argument("--steps", type=int, default=20, help="batches per timed run")
        t.add_argument("--warmup", type=int, default=5, help="untimed batches first")
        t.add_argument("--sweep", help="KEY=v1,v2,...: one run per value, e.g. train.batch_size=64,128,256")
        t.add_argument("--json", help="output JSON (default runs/bench/<command>-<config>.json)")
        t.add_argument("--png", help="output plot for compare/sweep/profile/tune (default: the JSON path, .png)")
        if name == "pipeline":
            t.add_argument("--profile-ops", action="store_true",
                           help="per-op cost: the recipe with each op removed in turn, side by side")
        if name == "compare":
            t.add_argument("--variants", help="backend:device list, e.g. dali:gpu,dali:cpu,torchvision:cpu "
                                              "(default: those this machine can run)")
            t.add_argument("--bench", choices=["pipeline", "train"], default="pipeline",
                           help="what each variant runs")
        if name == "tune":
            add_tune_arguments(p)


def main(args: argparse.Namespace) -> int:
    from ..data import DataError  # light: the data package loads torch
    try:
        if args.sweep and (args.bench_command in ("compare", "tune") or getattr(args, "profile_ops", False)):
            raise BenchError("--sweep runs one bench per value: use it with pipeline, model or train "
                             "(not with compare, tune or --profile-ops)")
        if args.bench_command == "compare":
            result, plot = run_compare(args), plot_compare
        elif args.bench_command == "tune":
            result, plot = run_tune(args), plot_tune
        elif args.sweep:
            result, plot = run_sweep(args), plot_sweep
        elif getattr(args, "profile_ops", False):
            result, plot = run_profile(args), plot_profile
        else:
            result, plot = run_one(args), None
    except (BenchError, DataError) as e:  # bad input: one line, exit 2
        print(f"sslight bench: error: {e}", file=sys.stderr)
        return 2
    report(result)
    json_path = Path(args.json or default_json_path(args))
    write_json(result, json_path)
    print(f"wrote {json_path}")
    if plot is not None:
        png = Path(args.png or json_path.with_suffix(".png"))
        plot(result, png)
        print(f"wrote {png}")
    return 0


def default_json_path(args) -> Path:
    kind = args.bench_command
    if args.bench_command not in ("compare", "tune") and args.sweep:
        kind += "-sweep-" + args.sweep.split("=", 1)[0].replace(".", "_")
    elif getattr(args, "profile_ops", False):
        kind += "-profile"
    return Path("runs/bench") / f"{kind}-{Path(args.config).stem}.json"
