"""The text table and the plots (compare, sweep, per-op profile). matplotlib is imported on use."""
from __future__ import annotations

from pathlib import Path

from .tune import summary_lines


def report(result: dict) -> None:
    runs = result.get("runs", [result])
    print(f"{'run':<28} {'bench':<8} {'batch':>5} {'thr':>4} {'img/s':>9} {'min':>9} {'max':>9} {'ms/img':>8}  extra")
    for r in runs:
        extra = f"CPU {r['cpu_ms_per_image']:.2f} ms/img ({r['cpu_cores_busy']:.1f} cores)" if "cpu_ms_per_image" in r else ""
        if r["bench"] == "train":
            extra += (f", model {r['model']['images_per_sec']:.1f} img/s, train/model {r['ratio_to_model']:.2f}, "
                     f"data-wait {100 * r['data_wait_fraction']:.0f}%")
        mem = r.get("gpu_memory")
        if mem:
            extra += f"{', ' if extra else ''}GPU mem +{mem['device_used_delta_bytes'] / 2**20:.0f} MiB"
        print(f"{r['label'][:28]:<28} {r['bench']:<8} {r['batch_size']:>5} {r['num_threads']:>4} "
              f"{r['images_per_sec']:>9.1f} {r['images_per_sec_min']:>9.1f} {r['images_per_sec_max']:>9.1f} "
              f"{r['ms_per_image']:>8.2f}  {extra}")
    for name, ratio in result.get("ratios", {}).items():
        print(f"ratio {name}: {ratio:.2f}x")
    if "tune" in result:
        print("\n".join(summary_lines(result)))
    if "ops" in result:
        ops = result["ops"]
        print(f"per-op cost (ms per image, wall, {ops['threads']} threads; full recipe {ops['full_ms_per_image']:.2f}):")
        for op, ms in ops["ms_per_image"].items():
            lo, hi = ops["ms_per_image_range"][op]
            print(f"  {op:<24} {ms:7.2f} ms  [{lo:6.2f} .. {hi:6.2f}]  ({ops['thread_ms_per_image'][op]:.2f} thread-ms)")


def _pyplot():
    import matplotlib  # light: matplotlib is loaded only to draw the PNGs
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt  # light: as matplotlib
    return plt


def _where(run: dict) -> str:
    env = run["env"]
    hw = env["gpu_name"] or f"{env['cpu_cores_available']}-core {env['cpu_model']}"
    return (f"{run['method']} {run['backbone']} {run['recipe']} ({'+'.join(run['views'])}), batch {run['batch_size']}"
            f"\n{hw}; median of {run['repeats']} x {run['steps_per_repeat']} batches, bars = min..max")


def _errors(runs: list[dict]) -> list[list[float]]:
    return [[r["images_per_sec"] - r["images_per_sec_min"] for r in runs],
            [r["images_per_sec_max"] - r["images_per_sec"] for r in runs]]


def plot_compare(result: dict, png: Path) -> None:
    plt, runs = _pyplot(), result["runs"]
    base = runs[-1]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(runs) + 2), 4))
    labels = [f"{r['label']}\n{r['num_threads']} threads" for r in runs]
    bars = ax.bar(labels, [r["images_per_sec"] for r in runs], yerr=_errors(runs), capsize=4, color="#4c72b0")
    for bar, r in zip(bars, runs):
        ax.annotate(f"{r['images_per_sec']:.0f}\n{r['images_per_sec'] / base['images_per_sec']:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"images/sec ({runs[0]['bench']})")
    ax.set_title(_where(runs[0]), fontsize=8)
    ax.margins(y=0.25)
    _save(fig, png)


def plot_sweep(result: dict, png: Path) -> None:
    plt, runs, key = _pyplot(), result["runs"], result["sweep"]["key"]
    values = result["sweep"]["values"]
    try:
        x = [float(v) for v in values]
    except ValueError:
        x = list(range(len(values)))  # categorical values: evenly spaced, labelled
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    a1.errorbar(x, [r["images_per_sec"] for r in runs], yerr=_errors(runs), marker="o", capsize=4)
    a1.set_ylabel("images/sec")
    a2.plot(x, [r["ms_per_image"] for r in runs], marker="o")
    a2.set_ylabel("ms per image (wall)")
    for ax in (a1, a2):
        ax.set_xlabel(key)
        ax.set_xticks(x, values)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{runs[0]['bench']} sweep, {runs[0]['label'].split('=')[0]}: " + _where(runs[0]), fontsize=8)
    _save(fig, png)


def plot_profile(result: dict, png: Path) -> None:
    plt, ops, run = _pyplot(), result["ops"], result["runs"][0]
    names = list(ops["ms_per_image"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.8))
    ms = [ops["ms_per_image"][n] for n in names]
    err = [[m - ops["ms_per_image_range"][n][0] for n, m in zip(names, ms)],
           [ops["ms_per_image_range"][n][1] - m for n, m in zip(names, ms)]]
    ax.barh(names, ms, xerr=err, capsize=3, color="#dd8452")
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per image (wall, {ops['threads']} threads); full recipe {ops['full_ms_per_image']:.2f} ms")
    ax.set_title(f"{run['backend']}-{run['device']} per-op cost by ablation\n" + _where(run), fontsize=8)
    _save(fig, png)


def plot_tune(result: dict, png: Path) -> None:
    """One panel per knob: images/sec of each candidate (min..max bars), the chosen value in orange."""
    plt, t, runs = _pyplot(), result["tune"], result["runs"]
    fig, axes = plt.subplots(1, len(t["rounds"]), figsize=(3.2 * len(t["rounds"]) + 1, 3.8), squeeze=False)
    for ax, rnd in zip(axes[0], t["rounds"]):
        done = [e for e in rnd["candidates"] if "run" in e]
        picked = [runs[e["run"]] for e in done]
        ax.bar([str(e["value"]) for e in done], [r["images_per_sec"] for r in picked], yerr=_errors(picked), capsize=3,
               color=["#dd8452" if e["value"] == rnd["chosen"] else "#4c72b0" for e in done])
        ax.set_xlabel(rnd["key"])
        ax.set_ylabel("images/sec")
    fig.suptitle(f"tune ({t['bench']}): best {' '.join(t['best_overrides'])}\n" + _where(runs[0]), fontsize=8)
    _save(fig, png)


def _save(fig, png: Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    _pyplot().close(fig)

