"""`sslight bench tune` on the CPU with tiny settings: every candidate recorded, the best is the argmax
of the recorded medians, the printed overrides load, bad input refused in one line.

The speed of each setting is made known: a sleep per batch that depends on the loader's threads and
queue depth (the real DALI pipeline runs underneath), so the search has a known answer.
"""
from __future__ import annotations

import json
import time

import pytest

from sslight_dali.bench import benches
from sslight_dali.cli import main as cli_main
from sslight_dali.run_config import load_config

from helpers import CONFIG, BENCH_TINY as TINY

FAST = ["--batch-size", "4", "--warmup", "1", "--steps", "1", "--repeats", "2", "--backend", "dali",
        "--device", "cpu"]


def slow_when(monkeypatch, seconds):
    """Each batch costs seconds(threads, prefetch, pipelines) more: a known ranking of the settings."""
    real = benches.endless

    def batches(loader):
        delay = seconds(loader.num_threads, loader.prefetch, getattr(loader, "pipelines", 1))
        for batch in real(loader):
            time.sleep(delay)
            yield batch

    monkeypatch.setattr(benches, "endless", batches)


def tune(tmp_path, capsys, *extra, data, overrides=()):
    out = tmp_path / "tune.json"
    code = cli_main(["bench", "tune", CONFIG, *TINY, *overrides, *FAST, "--data", str(data), "--json", str(out),
                     *extra])
    printed = capsys.readouterr()
    return code, out, printed


def test_tune_records_every_candidate_and_prints_the_argmax(tmp_path, capsys, data, monkeypatch):
    # threads=2, pipelines=2 and prefetch=1 are each faster; the config starts at threads=1 (flag),
    # pipelines=1, prefetch=2.
    slow_when(monkeypatch, lambda threads, prefetch, pipelines:
              0.3 * (threads == 1) + 0.15 * (prefetch == 2) + 0.15 * (pipelines == 1))
    code, out, printed = tune(tmp_path, capsys, "--threads", "1", "--candidates", "threads=1,2",
                              "--candidates", "prefetch=1,2", data=data, overrides=["data.pipelines=1"])
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    t, recs = result["tune"], result["runs"]
    # Round 1 from the start (1, 1, 2): threads 1 and 2; round 2 at threads=2: pipelines 1 (measured) and
    # 2; round 3 at threads=2, pipelines=2: prefetch 1 and 2 (2 already measured).
    assert [r["tune_setting"] for r in recs] == [
        {"threads": 1, "pipelines": 1, "prefetch": 2}, {"threads": 2, "pipelines": 1, "prefetch": 2},
        {"threads": 2, "pipelines": 2, "prefetch": 2}, {"threads": 2, "pipelines": 2, "prefetch": 1}]
    for r in recs:  # each setting was the one run, and is a full bench record
        assert r["bench"] == "pipeline" and len(r["per_repeat"]) == 2
        assert r["resolved_config"]["data"]["num_threads"] == r["tune_setting"]["threads"]
        assert r["resolved_config"]["data"]["prefetch"] == r["tune_setting"]["prefetch"]
        assert r["resolved_config"]["data"]["pipelines"] == r["tune_setting"]["pipelines"]
    for rnd in t["rounds"]:  # every candidate of every round points at a recorded run with its median
        assert [e["value"] for e in rnd["candidates"]] == [1, 2]
        for e in rnd["candidates"]:
            assert e["images_per_sec"] == recs[e["run"]]["images_per_sec"]
            assert recs[e["run"]]["tune_setting"][rnd["knob"]] == e["value"]
    best = max(recs, key=lambda r: r["images_per_sec"])
    assert best["tune_setting"] == {"threads": 2, "pipelines": 2, "prefetch": 1}  # the known answer
    assert t["best"] == best["tune_setting"] and t["best_images_per_sec"] == best["images_per_sec"]
    assert t["start_images_per_sec"] == recs[0]["images_per_sec"]
    assert (tmp_path / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert t["skipped_knobs"].keys() == {"hw_decoder_load"}  # no GPU here: skipped, and said so
    assert "data.hw_decoder_load" in printed.out and "skipped" in printed.out
    line = [ln for ln in printed.out.splitlines() if ln.startswith("data.num_threads=")][-1]
    assert line.split() == t["best_overrides"] == ["data.num_threads=2", "data.pipelines=2", "data.prefetch=1"]
    # The printed line is what a user pastes: `sslight config show` loads it.
    assert cli_main(["config", "show", CONFIG, *line.split()]) == 0
    shown = capsys.readouterr().out
    cfg = load_config(CONFIG, line.split())
    assert (cfg.data.num_threads, cfg.data.pipelines, cfg.data.prefetch) == (2, 2, 1)
    assert "num_threads: 2" in shown and "pipelines: 2" in shown and "prefetch: 1" in shown


def test_tune_from_auto_pipelines_sweeps_counts(tmp_path, capsys, data, monkeypatch):
    # data.pipelines=auto (the default): in the threads round the pipelines follow the threads as auto
    # does (1 thread: 1, 2 threads: 2), then the pipelines round measures the counts 1 and 2. Two
    # threads are faster, two pipelines slower: the answer is threads=2, pipelines=1. Every record
    # says how many pipelines its loader ran.
    slow_when(monkeypatch, lambda threads, prefetch, pipelines: 0.3 * (threads == 1) + 0.15 * (pipelines == 2))
    code, out, printed = tune(tmp_path, capsys, "--threads", "1", "--knobs", "threads,pipelines",
                              "--candidates", "threads=1,2", data=data)
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    t, recs = result["tune"], result["runs"]
    assert [r["tune_setting"] for r in recs] == [
        {"threads": 1, "pipelines": 1}, {"threads": 2, "pipelines": 2}, {"threads": 2, "pipelines": 1}]
    assert [r["pipelines"] for r in recs] == [1, 2, 1]
    assert t["start"] == {"threads": 1, "pipelines": 1} and t["candidates"]["pipelines"] == [1, 2]
    assert t["best"] == {"threads": 2, "pipelines": 1} and t["best_overrides"] == ["data.num_threads=2", "data.pipelines=1"]


def test_tune_resolves_auto_as_training_would_on_a_small_data_set(tmp_path, capsys, data, monkeypatch):
    # 16 images at batch 12: two pipelines would get 8 each, under a batch, so auto runs one, in
    # training and in tune's starting point alike (it used to start at 2, which could not run).
    slow_when(monkeypatch, lambda threads, prefetch, pipelines: 0.0)
    code, out, printed = tune(tmp_path, capsys, "--threads", "2", "--batch-size", "12", "--knobs",
                              "threads,pipelines", "--candidates", "threads=2", data=data)
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    assert result["tune"]["start"] == {"threads": 2, "pipelines": 1}
    assert [r["tune_setting"] for r in result["runs"]] == [{"threads": 2, "pipelines": 1}]  # 2 cannot run
    assert [r["pipelines"] for r in result["runs"]] == [1]


def test_tune_budget_and_batch_size_caveat(tmp_path, capsys, data):
    code, out, printed = tune(tmp_path, capsys, "--threads", "1", "--knobs", "batch_size", "--quick",
                              "--candidates", "batch_size=1,2,4,8,16", "--budget", "0.001", data=data)
    assert code == 0, printed.err
    t = json.loads(out.read_text())["tune"]
    assert t["candidates"] == {"batch_size": [2, 4, 8]}  # --quick: the start (4) and its neighbours
    # The budget is spent at once: only the starting batch (4) is measured, the two others are counted.
    assert t["measured"] == 1 and t["not_measured_budget"] == 2 and t["best"] == {"batch_size": 4}
    assert [e["status"] for e in t["rounds"][0]["candidates"]] == [
        "not measured: --budget reached", "measured", "not measured: --budget reached"]
    assert "changes the optimisation" in printed.out and t["caveat"]
    assert [ln for ln in printed.out.splitlines() if ln.startswith("train.")] == ["train.batch_size=4"]


@pytest.mark.parametrize("extra, named", [
    (["--knobs", "threads,warp"], "'warp'"),
    (["--candidates", "workers=2,4"], "'workers'"),
    (["--candidates", "threads=two"], "threads"),
    (["--candidates", "threads=0,2"], "num_threads"),  # the config's range, checked before any run
])
def test_tune_bad_input_one_line_exit_2(tmp_path, capsys, data, extra, named):
    code, out, printed = tune(tmp_path, capsys, *extra, data=data)
    assert code == 2
    err = printed.err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "error" in err[0]
    assert not out.exists()


def test_tune_a_failed_candidate_is_recorded_and_the_search_goes_on(tmp_path, capsys, data, monkeypatch):
    from sslight_dali.bench import tune as tune_module
    real = tune_module.run_one

    def run_one(args, extra, **kw):
        if "data.num_threads=2" in extra:  # as DALI or torch say it when the GPU is full
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(args, extra, **kw)

    monkeypatch.setattr(tune_module, "run_one", run_one)
    code, out, printed = tune(tmp_path, capsys, "--threads", "1", "--knobs", "threads",
                              "--candidates", "threads=1,2", data=data)
    assert code == 0, printed.err
    t = json.loads(out.read_text())["tune"]
    failed = [e for e in t["rounds"][0]["candidates"] if e["status"] == "failed"]
    assert t["failed"] == 1 and [e["value"] for e in failed] == [2]
    assert failed[0]["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert t["best"] == {"threads": 1} and t["measured"] == 1
    assert "1 candidate(s) failed" in printed.out


def test_tune_train_with_torchvision_skips_prefetch(tmp_path, capsys, data):
    code, out, printed = tune(tmp_path, capsys, "--backend", "torchvision", "--bench", "train", "--threads", "1",
                              "--knobs", "threads,prefetch", "--candidates", "threads=1", data=data)
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    t = result["tune"]
    assert t["skipped_knobs"].keys() == {"prefetch"} and "torchvision" in t["skipped_knobs"]["prefetch"]
    assert [r["bench"] for r in result["runs"]] == ["train"]  # end to end, the model figure beside it
    assert "ratio_to_model" in result["runs"][0] and result["runs"][0]["backend"] == "torchvision"
    assert t["best_overrides"] == ["data.num_threads=1"]


def test_a_pipeline_count_that_does_not_fit_is_recorded_not_fatal(tmp_path, capsys, data):
    # One thread: data.pipelines=2 cannot run (each pipeline needs a thread). The tune records it as
    # failed, measures pipelines=1 and ends normally.
    code, out, printed = tune(tmp_path, capsys, "--threads", "1", "--knobs", "pipelines", data=data)
    assert code == 0, printed.err
    t = json.loads(out.read_text())["tune"]
    (rnd,) = t["rounds"]
    status = {e["value"]: e["status"] for e in rnd["candidates"]}
    assert status == {1: "measured", 2: "failed"} and t["failed"] == 1
    assert "data.pipelines=2 needs at least as many data.num_threads" in rnd["candidates"][1]["error"]
    assert t["best"] == {"pipelines": 1}


@pytest.mark.parametrize("gpu, probe, skipped", [
    ("NVIDIA H100 80GB HBM3", True, False), ("NVIDIA H100 80GB HBM3", None, False),  # by name when not asked
    ("NVIDIA H100 80GB HBM3", False, True),  # e.g. Docker without the video capability
    ("NVIDIA L4", True, False),  # the probe decides over the list of names
    ("NVIDIA L4", None, True)])
def test_hw_decoder_knob_follows_the_nvjpeg_probe(monkeypatch, gpu, probe, skipped):
    from sslight_dali.bench import environment, tune
    monkeypatch.setattr(environment, "nvjpeg_hw_probe", lambda: {"available": probe, "status": None, "library": None})
    monkeypatch.setattr(environment, "static_environment", lambda: {"gpu_name": gpu})
    monkeypatch.setattr(tune, "static_environment", lambda: {"gpu_name": gpu})
    reason = tune.skip_reason("hw_decoder_load", "dali", "gpu")
    assert (reason is not None) == skipped, reason
    assert tune.skip_reason("hw_decoder_load", "dali", "cpu") is not None
