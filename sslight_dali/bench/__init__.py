"""`sslight bench`: images/sec of view sampling, of the model step, and of training end to end.

    sslight bench pipeline CONFIG   view sampling alone (decode + every view of the recipe)
    sslight bench model CONFIG      Trainer.train_step on pre-made device tensors (the compute ceiling)
    sslight bench train CONFIG      real loader + Trainer.train_step, with `model` run beside it
    sslight bench compare CONFIG    several backends/devices side by side, ratios, JSON + PNG
    sslight bench tune CONFIG       the fastest loader settings on this node, printed as overrides

Every figure is the median over `--repeats` timed runs of `--steps` batches each, after `--warmup`
batches. Runs that are compared are measured one after another in the same process, each with its
own loader, so they never compete for the CPU. Each JSON record carries the environment (versions,
GPU, CPU, hardware JPEG decoder), the config and its overrides, and the dataset.

Modules: cli (subcommands and flags), runs (dataset, one bench run, its JSON record), benches (the
three benches, with torch, the loaders and the trainer: loaded when a bench runs, not by this
package), timing (the measuring loop, CPU time), environment (versions and hardware), sweeps (sweeps,
comparisons, per-op ablations), tune (coordinate descent over the loader knobs), plots (table and
PNGs). Importing this package loads neither torch, DALI nor matplotlib.
"""
from .cli import COMMANDS, add_arguments, default_json_path, main
from .environment import cpu_model, hw_decoder_info, nvidia_driver_version, nvjpeg_hw_probe, static_environment
from .plots import plot_compare, plot_profile, plot_sweep, plot_tune, report
from .runs import (BENCH_COPIES, BENCH_DATA, BENCH_SYNTH, dataset_info, ensure_bench_data, flag_overrides, make_record,
                   release_memory, resolve_dataset, run_one, write_json)
from .sweeps import (ABLATIONS, compare_ratios, compare_variants, op_costs, op_in_recipe, parse_sweep, run_compare,
                     run_profile, run_sweep)
from .timing import BenchError, cpu_seconds, endless, measure, summarize
from .tune import KNOBS, run_tune

__all__ = [
    "COMMANDS", "add_arguments", "default_json_path", "main",
    "cpu_model", "hw_decoder_info", "nvidia_driver_version", "nvjpeg_hw_probe", "static_environment",
    "plot_compare", "plot_profile", "plot_sweep", "plot_tune", "report",
    "BENCH_COPIES", "BENCH_DATA", "BENCH_SYNTH", "dataset_info", "ensure_bench_data", "flag_overrides", "make_record",
    "release_memory", "resolve_dataset", "run_one", "write_json",
    "ABLATIONS", "compare_ratios", "compare_variants", "op_costs", "op_in_recipe", "parse_sweep", "run_compare",
    "run_profile", "run_sweep",
    "BenchError", "cpu_seconds", "endless", "measure", "summarize",
    "KNOBS", "run_tune",
]
