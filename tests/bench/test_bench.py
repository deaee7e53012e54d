"""`sslight bench` on the CPU with tiny settings: record schema, ratios, stats, sweeps, bad input.

No timing is asserted: only that the figures are computed from what was measured.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sslight_dali import bench
from sslight_dali.bench import benches  # the module whose step and batch source the tests replace
from sslight_dali.cli import main as cli_main

from helpers import CONFIG, BENCH_TINY as TINY

FAST = ["--batch-size", "4", "--threads", "1", "--warmup", "1", "--steps", "1", "--repeats", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(tmp_path: Path, command: str, *extra: str, data: Path | None = None, name: str = "out") -> dict:
    out = tmp_path / f"{name}.json"
    argv = ["bench", command, CONFIG, *TINY, *FAST, "--json", str(out), *extra]
    if data is not None:
        argv += ["--data", str(data)]
    assert cli_main(argv) == 0
    return json.loads(out.read_text())


def check_record(rec: dict, bench_name: str, repeats: int = 2) -> None:
    types = {"images_per_sec": float, "images_per_sec_min": float, "images_per_sec_max": float, "repeats": int,
             "backend": str, "device": str, "config": str, "overrides": list, "env": dict, "date": str,
             "per_repeat": list, "batch_size": int, "num_threads": int, "label": str, "resolved_config": dict}
    for key, tp in types.items():
        assert isinstance(rec[key], tp), f"{key}: {rec.get(key)!r}"
    assert rec["bench"] == bench_name and rec["config"] == CONFIG
    assert rec["repeats"] == repeats == len(rec["per_repeat"])
    assert rec["images_per_sec_min"] <= rec["images_per_sec"] <= rec["images_per_sec_max"]
    assert rec["images_per_sec"] == pytest.approx(float(np.median([r["images_per_sec"] for r in rec["per_repeat"]])))
    env = rec["env"]
    for key in ("torch", "torchvision", "dali", "timm", "cpu_model", "cpu_cores", "cuda", "gpu_name", "driver"):
        assert key in env
    hw = env["hw_jpeg_decoder"]
    assert {"hw_decoder_load", "gpu_has_hw_jpeg_decoder", "hw_decoder_used"} <= set(hw)
    assert hw["hw_decoder_used"] is False  # no GPU here
    for o in TINY:
        assert o in rec["overrides"]
    check_measured(rec["per_repeat"])


def check_measured(per_repeat: list[dict], steps: int = 1, batch: int = 4) -> None:
    """Each repeat counted the images it timed and divided by the time it took."""
    for r in per_repeat:
        assert r["images"] == steps * batch
        assert r["seconds"] > 0 and r["images_per_sec"] == pytest.approx(r["images"] / r["seconds"], rel=1e-12)
        assert 0.0 <= r["data_wait_fraction"] <= 1.0


def test_cpu_seconds_counts_other_threads_and_child_processes():
    def spin():  # 0.4 s of CPU on this thread, while the main thread sleeps in join()
        t = time.thread_time()
        while time.thread_time() - t < 0.4:
            pass

    before = bench.cpu_seconds()
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    assert bench.cpu_seconds() - before >= 0.4
    # A child process (a DataLoader worker): counted while it runs, and still after it is reaped.
    code = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
            "print('spun', flush=True)\ntime.sleep(60)")
    before = bench.cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "spun"
        live = bench.cpu_seconds() - before
        assert live >= 0.45  # /proc counts in clock ticks (10 ms)
    finally:
        child.kill()
        child.wait()
    assert bench.cpu_seconds() - before >= live


def test_cpu_time_per_image_within_what_the_cores_allow(tmp_path, data):
    rec = run(tmp_path, "pipeline", "--backend", "dali", "--device", "cpu", "--threads", "2", "--steps", "2",
              data=data)
    cores = len(os.sched_getaffinity(0))
    for r in rec["per_repeat"]:
        # DALI's threads all count, and no more CPU than the cores can give over the repeat's wall time.
        assert 0 < r["cpu_seconds"] <= cores * r["seconds"] * 1.1 + 0.02
        assert r["cpu_ms_per_image"] == pytest.approx(1000 * r["cpu_seconds"] / r["images"])
        assert r["cpu_cores_busy"] == pytest.approx(r["cpu_seconds"] / r["seconds"])
    assert rec["cpu_ms_per_image"] == pytest.approx(float(np.median([r["cpu_ms_per_image"]
                                                                    for r in rec["per_repeat"]])))


def test_summarize_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 7):
        v = rng.uniform(10, 1000, n).tolist()
        s = bench.summarize(v)
        assert s == pytest.approx({"median": np.median(v), "min": np.min(v), "max": np.max(v)})
    with pytest.raises(ValueError):
        bench.summarize([])


def test_pipeline_record(tmp_path, data):
    rec = run(tmp_path, "pipeline", "--backend", "dali", "--device", "cpu", data=data)
    check_record(rec, "pipeline")
    assert (rec["backend"], rec["device"]) == ("dali", "cpu")
    ds = rec["dataset"]
    assert ds["images"] == 16 and ds["mean_file_bytes"] > 0 and ds["path"] == str(data.resolve())
    assert "data.root=" + str(data) in rec["overrides"]


def test_model_record(tmp_path):
    rec = run(tmp_path, "model")
    check_record(rec, "model")
    assert rec["backend"] == "synthetic" and rec["dataset"] is None


def test_train_record_has_model_beside_it(tmp_path, data):
    rec = run(tmp_path, "train", "--backend", "dali", "--device", "cpu", data=data)
    check_record(rec, "train")
    model = rec["model"]
    assert len(model["per_repeat"]) == 2
    assert rec["ratio_to_model"] == pytest.approx(rec["images_per_sec"] / model["images_per_sec"])
    check_measured(model["per_repeat"])
    assert 0.0 <= rec["data_wait_fraction"] <= 1.0


def test_compare_ratios_come_from_runs(tmp_path, data):
    out = run(tmp_path, "compare", "--variants", "dali:cpu,torchvision:cpu", data=data)
    assert [r["label"] for r in out["runs"]] == ["dali-cpu", "torchvision-cpu"]
    for r in out["runs"]:
        check_record(r, "pipeline")
    a, b = out["runs"]
    assert out["ratios"] == pytest.approx({"dali-cpu/torchvision-cpu": a["images_per_sec"] / b["images_per_sec"]})
    assert (tmp_path / "out.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_one_record_per_value_and_png(tmp_path, data):
    out = run(tmp_path, "pipeline", "--sweep", "recipe.local.count=1,2", "--backend", "dali", "--device", "cpu",
              data=data)
    assert out["sweep"] == {"key": "recipe.local.count", "values": ["1", "2"]}
    assert [r["resolved_config"]["recipe"]["local"]["count"] for r in out["runs"]] == [1, 2]
    for r in out["runs"]:
        check_record(r, "pipeline")
    assert (tmp_path / "out.png").read_bytes()[:8] == PNG_MAGIC


def test_profile_ops_costs_from_runs(tmp_path, data):
    out = run(tmp_path, "pipeline", "--profile-ops", "--backend", "dali", "--device", "cpu", data=data)
    ms = {r["label"]: 1000 / r["images_per_sec"] for r in out["runs"]}
    ops = out["ops"]["ms_per_image"]
    assert ops["gaussian_blur"] == pytest.approx(ms["full"] - ms["no_gaussian_blur"])
    assert ops["decode_crop_normalize"] == pytest.approx(ms["crop_only"])
    assert out["runs"][0]["label"] == "full"
    assert (tmp_path / "out.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_data_dir_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    assert cli_main(["bench", "pipeline", CONFIG, *FAST, "--data", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_bad_sweep_spec(tmp_path, capsys):
    assert cli_main(["bench", "model", CONFIG, *FAST, "--sweep", "train.batch_size"]) == 2
    assert "--sweep" in capsys.readouterr().err


def test_import_is_cheap():
    import subprocess
    import sys
    code = "import sys, sslight_dali.bench; print([m for m in ('torch', 'nvidia.dali', 'matplotlib') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the figures follow what was timed ------------------------------------------------------------
STEP_S = 0.5  # a step of known duration; the timed loop must contain it, once per batch


def test_model_bench_follows_a_step_of_known_duration(tmp_path, monkeypatch):
    calls = []

    def sleeping_step(trainer, device):
        def run(views, labels):
            calls.append(labels.shape[0])
            time.sleep(STEP_S)
        return run

    monkeypatch.setattr(benches, "trainer_step", sleeping_step)
    rec = run(tmp_path, "model", "--steps", "2")
    assert calls == [4] * (1 + 2 * 2)  # warmup 1, then 2 repeats of 2 steps
    for r in rec["per_repeat"]:
        # The timed loop holds the two sleeps and little else (a loop that skips the step, or times
        # something else, is far off).
        assert 2 * STEP_S <= r["seconds"] < 2 * STEP_S + 1.0
        assert r["images_per_sec"] <= 8 / (2 * STEP_S)
    check_measured(rec["per_repeat"], steps=2)


@pytest.mark.parametrize("flag", [[], ["--compile"]], ids=["eager", "compile"])
def test_first_step_is_timed_apart_as_the_start_up_cost(tmp_path, monkeypatch, flag):
    calls = []

    def slow_first_step(trainer, device):
        def run(views, labels):
            calls.append(labels.shape[0])
            time.sleep(3 * STEP_S if len(calls) == 1 else STEP_S)  # the first call compiles
        return run

    monkeypatch.setattr(benches, "trainer_step", slow_first_step)
    rec = run(tmp_path, "model", "--steps", "2", *flag)
    assert 3 * STEP_S <= rec["first_step_s"] < 3 * STEP_S + 0.5
    steady = rec["batch_size"] / rec["images_per_sec"]
    if flag:
        assert "train.compile=true" in rec["overrides"] and rec["resolved_config"]["train"]["compile"] is True
        assert rec["compile"] is True and rec["compile_s"] == pytest.approx(rec["first_step_s"] - steady)
        assert 2 * STEP_S - 0.3 < rec["compile_s"] < 2 * STEP_S + 0.5
    else:
        assert rec["compile"] is False and rec["compile_s"] is None


def test_pipeline_bench_counts_time_spent_waiting_for_batches(tmp_path, data, monkeypatch):
    real = benches.endless

    def slow_batches(loader):
        for batch in real(loader):
            time.sleep(STEP_S)
            yield batch

    monkeypatch.setattr(benches, "endless", slow_batches)
    rec = run(tmp_path, "pipeline", "--backend", "dali", "--device", "cpu", "--steps", "2", data=data)
    for r in rec["per_repeat"]:
        assert 2 * STEP_S <= r["seconds"] < 2 * STEP_S + 3.0
        # No step: all of the repeat is data wait, the sleeps included.
        assert r["data_wait_fraction"] > 0.95
        assert r["images_per_sec"] <= 8 / (2 * STEP_S)
    check_measured(rec["per_repeat"], steps=2)
