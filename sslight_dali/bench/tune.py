"""`sslight bench tune`: the loader settings that give the most images/sec on this node.

Coordinate descent from the config's values: one knob at a time, in the order given, every
candidate value measured with the others held at the best found so far (the same --repeats,
--steps and --warmup for every candidate). "Best" is the highest median images/sec. A setting
already measured is not measured again, so each knob's round contains the best setting so far and
the final setting is the best of every run recorded.
"""
from __future__ import annotations

import os
import sys
import time

from .environment import hw_jpeg_decoder_available, nvjpeg_hw_probe, static_environment
from .runs import flag_overrides, release_memory, resolve_dataset, run_one
from .timing import BenchError

# knob -> (config key, type). The order of DEFAULT_KNOBS is the order they are tuned in: threads
# first (the biggest lever on the CPU), then how many pipelines share them, the queue depth, the
# decoder split.
KNOBS = {"threads": ("data.num_threads", int), "pipelines": ("data.pipelines", int), "prefetch": ("data.prefetch", int),
         "hw_decoder_load": ("data.hw_decoder_load", float), "batch_size": ("train.batch_size", int)}
DEFAULT_KNOBS = ("threads", "pipelines", "prefetch", "hw_decoder_load")
RULE = "highest median images/sec over --repeats timed runs; one knob at a time, the others at their best so far"
BATCH_CAVEAT = ("train.batch_size changes the optimisation, not only the speed: the peak LR scales with it "
                "(optim.base_lr is per 256 images), and the steps per epoch and batch statistics change; "
                "img/s says nothing about accuracy")


def add_tune_arguments(p) -> None:
    t = p.add_argument_group("tune")
    t.add_argument("--knobs", default=",".join(DEFAULT_KNOBS),
                   help=f"knobs to tune, in this order, from {', '.join(KNOBS)} (default: %(default)s; "
                        "batch_size only when named: it changes the optimisation)")
    t.add_argument("--candidates", action="append", default=[], metavar="KNOB=v1,v2,...",
                   help="values to try for one knob (repeatable; names the knob to tune if --knobs did not); "
                        "default: derived from this machine's cores and the config's values")
    t.add_argument("--bench", choices=["pipeline", "train"], default="pipeline",
                   help="what each candidate runs (train: real loader + training step)")
    t.add_argument("--budget", type=float, help="seconds: start no candidate after this (the starting setting "
                                                "is always measured); the rest are recorded as not measured")
    t.add_argument("--quick", action="store_true",
                   help="per knob, only the starting value and its neighbours in the candidate list")


def parse_knobs(args) -> tuple[list[str], dict[str, list]]:
    """The knobs to tune, in order, and any candidate lists the user gave (values typed and deduplicated)."""
    knobs = [k.strip() for k in args.knobs.split(",") if k.strip()]
    given = {}
    for spec in args.candidates:
        knob, sep, raw = spec.partition("=")
        knob = knob.strip()
        if knob not in KNOBS:
            raise BenchError(f"--candidates {spec!r}: unknown knob {knob!r} (known: {', '.join(KNOBS)})")
        kind = KNOBS[knob][1]
        try:
            values = [kind(v) for v in raw.split(",") if v.strip()] if sep else []
        except ValueError:
            raise BenchError(f"--candidates {spec!r}: values of {knob} must be {kind.__name__}s") from None
        if not values:
            raise BenchError(f"--candidates {spec!r}: expected KNOB=v1,v2,... e.g. threads=2,4,8")
        given[knob] = sorted(set(values))
        if knob not in knobs:
            knobs.append(knob)
    for knob in knobs:
        if knob not in KNOBS:
            raise BenchError(f"--knobs: unknown knob {knob!r} (known: {', '.join(KNOBS)})")
    if not knobs or len(set(knobs)) != len(knobs):
        raise BenchError(f"--knobs {args.knobs!r}: name each knob once, e.g. threads,prefetch")
    if args.budget is not None and args.budget <= 0:
        raise BenchError(f"--budget {args.budget}: must be > 0 seconds")
    return knobs, given


def default_candidates(knob: str, start, cores: int) -> list:
    """Candidates from the machine: threads up to the cores available to this process (powers of two
    and the core count), DALI's usual queue depths, the decoder shares worth telling apart, and
    half / double the batch."""
    if knob == "threads":
        values = {cores} | {2 ** i for i in range(cores.bit_length()) if 2 ** i < cores}
    elif knob == "prefetch":
        values = {1, 2, 4}
    elif knob == "pipelines":  # more than data.num_threads, or too few images each: recorded as failed
        values = {1, 2}
    elif knob == "hw_decoder_load":
        values = {0.0, 0.65, 0.9, 1.0}
    else:
        values = {max(1, start // 2), start * 2}
    return sorted(values | {start})


def skip_reason(knob: str, backend: str, device: str) -> str | None:
    """Why a knob does nothing for this backend/device (the knob is then skipped and the output says so)."""
    if knob == "prefetch" and backend != "dali":
        return "data.prefetch is DALI's queue depth; the torchvision loader does not use it"
    if knob == "pipelines" and backend != "dali":
        return "data.pipelines counts DALI pipelines; the torchvision loader does not use it"
    if knob == "hw_decoder_load":
        if backend != "dali" or device != "gpu":
            return "no hardware JPEG decoding: it needs the DALI pipeline on a GPU (data.device=gpu)"
        if not hw_jpeg_decoder_available():
            return (f"no hardware JPEG decoder on this GPU ({static_environment()['gpu_name']}; nvJPEG hardware "
                    f"backend: {nvjpeg_hw_probe()})")
    return None


def label(setting: dict) -> str:
    short = {"threads": "thr", "pipelines": "pl", "prefetch": "pf", "hw_decoder_load": "hw", "batch_size": "bs"}
    return " ".join(f"{short[k]}={v}" for k, v in setting.items())


def as_overrides(setting: dict) -> list[str]:
    return [f"{KNOBS[k][0]}={v}" for k, v in setting.items()]


def run_tune(args) -> dict:
    # light: the data package loads torch
    from ..run_config import load_config  # light: loading a config by its method imports the methods (torch)
    from ..data import DataError, PipelinesDoNotFit
    from ..data.base import resolve_device
    from ..data.build import resolve_pipelines
    knobs, given = parse_knobs(args)
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args))
    backend, device = cfg.data.backend, resolve_device(cfg.data.device)
    values = {"threads": cfg.data.num_threads, "pipelines": cfg.data.pipelines, "prefetch": cfg.data.prefetch,
              "hw_decoder_load": cfg.data.hw_decoder_load, "batch_size": cfg.train.batch_size}
    cores = len(os.sched_getaffinity(0))
    skipped = {k: r for k in knobs if (r := skip_reason(k, backend, device))}
    tuned = [k for k in knobs if k not in skipped]

    # auto gives 2 pipelines only where each gets a full batch of the data set's images (one process)
    images = resolve_dataset(cfg)["images"] if values["pipelines"] == "auto" and backend == "dali" else None

    def concrete(setting: dict) -> dict:
        """The setting with data.pipelines=auto as the count the training loader would give it: until
        its own round the pipelines follow the threads as auto does, and runs are keyed by counts."""
        if setting.get("pipelines") != "auto":
            return setting
        return {**setting, "pipelines": resolve_pipelines("auto", device, setting.get("threads", cfg.data.num_threads),
                                                          images, setting.get("batch_size", values["batch_size"]))}

    start = {k: values[k] for k in tuned}
    candidates = {}
    for k in tuned:
        first = concrete(start)[k]
        cands = sorted(set(given.get(k) or default_candidates(k, first, cores)) | {first})
        if args.quick:
            i = cands.index(first)
            cands = cands[max(0, i - 1):i + 2]
        candidates[k] = cands
    for k, cands in candidates.items():  # bad values fail now, in one line, not after minutes of runs
        for v in cands:
            load_config(args.config, list(args.overrides) + flag_overrides(args) + as_overrides({k: v}))
    for k, why in skipped.items():
        print(f"tune: {k} skipped: {why}", file=sys.stderr)
    if not tuned:
        raise BenchError(f"--knobs {','.join(knobs)}: none of them applies to {backend} on {device}")

    t0 = time.monotonic()
    runs, measured, rounds = [], {}, []
    current = dict(start)
    for knob in tuned:
        entries = []
        # The current value first: with a --budget, the starting setting is always measured.
        for v in sorted(candidates[knob], key=lambda v: v != concrete(current)[knob]):
            setting = concrete({**current, knob: v})
            key = tuple(setting.items())
            entry = {"value": v}
            if key in measured:
                entry.update(status="measured earlier", run=measured[key])
            elif runs and args.budget is not None and time.monotonic() - t0 >= args.budget:
                entry.update(status="not measured: --budget reached")
            else:
                print(f"tune: {knob}: {label(setting)}", file=sys.stderr)
                try:
                    rec = run_one(args, as_overrides(setting), label=label(setting), kind=args.bench)
                except PipelinesDoNotFit as e:  # too many pipelines for the threads or the images: this
                    entry.update(status="failed", error=str(e))  # setting only, the others may fit
                    print(f"tune: {label(setting)} failed: {entry['error']}", file=sys.stderr)
                except (BenchError, DataError):  # bad input: stop, one line
                    raise
                except RuntimeError as e:  # e.g. out of GPU memory at a large batch: recorded, the search goes on
                    entry.update(status="failed", error=(str(e).strip() or type(e).__name__).splitlines()[0][:300])
                    print(f"tune: {label(setting)} failed: {entry['error']}", file=sys.stderr)
                else:
                    rec["tune_setting"] = dict(setting)
                    runs.append(rec)
                    measured[key] = len(runs) - 1
                    entry.update(status="measured", run=len(runs) - 1)
                release_memory()
            if "run" in entry:
                entry["images_per_sec"] = runs[entry["run"]]["images_per_sec"]
            entries.append(entry)
        entries.sort(key=lambda e: e["value"])
        ok = [e for e in entries if "run" in e]
        current = concrete(current) if knob == "pipelines" else current  # measured as a count
        if ok:
            current[knob] = max(ok, key=lambda e: e["images_per_sec"])["value"]
        rounds.append({"knob": knob, "key": KNOBS[knob][0], "candidates": entries, "chosen": current[knob]})
    if not runs:
        raise BenchError("tune: no candidate could be measured (see the errors above)")
    current, start = concrete(current), concrete(start)
    best = runs[measured[tuple(current.items())]] if tuple(current.items()) in measured else None
    if best is None:  # the starting setting failed and nothing in its round ran: report the best run seen
        best = max(runs, key=lambda r: r["images_per_sec"])
        current = dict(best["tune_setting"])
    first = runs[measured[tuple(start.items())]] if tuple(start.items()) in measured else None
    all_entries = [e for r in rounds for e in r["candidates"]]
    summary = {
        "bench": args.bench, "rule": RULE, "knobs": tuned, "skipped_knobs": skipped, "cores": cores,
        "backend": backend, "device": device, "candidates": candidates, "start": start, "best": current,
        "best_overrides": as_overrides(current), "best_images_per_sec": best["images_per_sec"],
        "start_images_per_sec": first["images_per_sec"] if first else None,
        "speedup": best["images_per_sec"] / first["images_per_sec"] if first else None,
        "rounds": rounds, "measured": len(runs),
        "not_measured_budget": sum(e["status"].startswith("not measured") for e in all_entries),
        "failed": sum(e["status"] == "failed" for e in all_entries),
        "seconds": time.monotonic() - t0,
        "caveat": BATCH_CAVEAT if "batch_size" in tuned else None,
    }
    return {"tune": summary, "runs": runs}


def summary_lines(result: dict) -> list[str]:
    t = result["tune"]
    out = [f"tune ({t['bench']}, {t['backend']} on {t['device']}, {t['cores']} cores): {t['rule']}"]
    for r in t["rounds"]:
        vals = ", ".join(f"{e['value']}: {e['images_per_sec']:.1f}" if "images_per_sec" in e else
                         f"{e['value']}: {e['status']}" for e in r["candidates"])
        out.append(f"  {r['key']:<22} {vals}  -> {r['chosen']}")
    for k, why in t["skipped_knobs"].items():
        out.append(f"  {KNOBS[k][0]:<22} skipped: {why}")
    if t["not_measured_budget"]:
        out.append(f"  {t['not_measured_budget']} candidate(s) not measured: --budget reached")
    if t["failed"]:
        out.append(f"  {t['failed']} candidate(s) failed (error in the JSON)")
    gain = f" (start {t['start_images_per_sec']:.1f} img/s, {t['speedup']:.2f}x)" if t["speedup"] else ""
    out.append(f"best: {t['best_images_per_sec']:.1f} img/s{gain}; as overrides:")
    if t["caveat"]:
        out.append(f"note: {t['caveat']}")
    out.append(" ".join(t["best_overrides"]))
    return out
