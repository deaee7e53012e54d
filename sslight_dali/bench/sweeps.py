"""Several runs side by side: sweeps over one key, backend:device comparisons, per-op ablations."""
from __future__ import annotations

import os

from ..augment import OPS, ablations
from .runs import flag_overrides, release_memory, run_one
from .timing import BenchError

# Ops removed one at a time by --profile-ops: name -> overrides that take the op out of the graph
# (the DALI graph leaves out an op whose probability is 0, so this measures the op's full cost).
# Every op of the table (sslight_dali/augment.py), and the local views.
ABLATIONS = {**ablations(), "local_views": ["recipe.local.count=0"]}


def run_sweep(args) -> dict:
    key, values = parse_sweep(args.sweep)
    runs = [run_one(args, [f"{key}={v}"], label=f"{key}={v}") for v in values]
    for rec, v in zip(runs, values):
        rec["sweep_value"] = v
    return {"sweep": {"key": key, "values": values}, "runs": runs}


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    key, sep, raw = spec.partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()] if sep else []
    if not key.strip() or not values:
        raise BenchError(f"--sweep {spec!r}: expected KEY=v1,v2,... e.g. train.batch_size=64,128,256")
    return key.strip(), values


def compare_variants(args) -> list[tuple[str, str]]:
    if args.variants:
        out = []
        for item in args.variants.split(","):
            backend, _, device = item.strip().partition(":")
            if backend not in ("dali", "torchvision") or device not in ("gpu", "cpu", "auto"):
                raise BenchError(f"--variants: {item!r} is not backend:device (dali|torchvision : gpu|cpu|auto)")
            out.append((backend, device))
        return out
    import torch  # light: `sslight bench --help` loads no torch
    if torch.cuda.is_available():
        return [("dali", "gpu"), ("dali", "cpu"), ("torchvision", "cpu")]
    return [("dali", "cpu"), ("torchvision", "cpu")]


def run_compare(args) -> dict:
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))  # "all cores" unless told otherwise
    runs = []
    for backend, device in compare_variants(args):
        extra = [f"data.backend={backend}", f"data.device={device}"]
        runs.append(run_one(args, extra, label=f"{backend}-{device}", kind=args.bench))
        release_memory()
    return {"runs": runs, "ratios": compare_ratios(runs)}


def compare_ratios(runs: list[dict]) -> dict:
    """images_per_sec of every earlier run over every later one, e.g. 'dali-cpu/torchvision-cpu'."""
    return {f"{a['label']}/{b['label']}": a["images_per_sec"] / b["images_per_sec"]
            for i, a in enumerate(runs) for b in runs[i + 1:]}


def run_profile(args) -> dict:
    """The full recipe, then the recipe with each op it uses taken out, then all photometric ops out."""
    from ..run_config import load_config  # light: loading a config by its method imports the methods (torch)
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args))
    ops = [op for op in ABLATIONS if op_in_recipe(cfg.recipe, op)]
    photometric = [o for op in ops if op != "local_views" for o in ABLATIONS[op]]
    plan = [("full", [])] + [(f"no_{op}", ABLATIONS[op]) for op in ops] + [("crop_only", photometric)]
    runs = []
    for label, extra in plan:
        runs.append(run_one(args, extra, label=label, kind="pipeline"))
        release_memory()
    return {"runs": runs, "ops": op_costs(runs, ops, cfg.data.num_threads)}


def op_in_recipe(recipe, op: str) -> bool:
    if op == "local_views":
        return recipe.local.count > 0
    return next(o for o in OPS if o.name == op).used(recipe)


def op_costs(runs: list[dict], ops: list[str], threads: int) -> dict:
    """ms per image of each op = ms/image of the full recipe - ms/image without the op (wall time).
    `ms_per_image_range` bounds it from the runs' min/max: an op whose range spans 0 is below the noise.
    `thread_ms_per_image` scales by the thread count: the CPU time the op costs if all threads are busy."""
    med = {r["label"]: 1000.0 / r["images_per_sec"] for r in runs}
    fast = {r["label"]: 1000.0 / r["images_per_sec_max"] for r in runs}
    slow = {r["label"]: 1000.0 / r["images_per_sec_min"] for r in runs}
    out = {op: med["full"] - med[f"no_{op}"] for op in ops}
    rng = {op: [fast["full"] - slow[f"no_{op}"], slow["full"] - fast[f"no_{op}"]] for op in ops}
    out["decode_crop_normalize"] = med["crop_only"]
    rng["decode_crop_normalize"] = [fast["crop_only"], slow["crop_only"]]
    return {"ms_per_image": out, "ms_per_image_range": rng, "full_ms_per_image": med["full"], "threads": threads,
            "thread_ms_per_image": {k: v * threads for k, v in out.items()}}


