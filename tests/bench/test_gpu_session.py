"""bench/gpu_session.sh on the CPU: the plan fits one device lease (15 min: calls 1-4 at most 13, the
measurement call's limits at most 8 min), the calls carry the DALI parts one each, in order; the dry
run's commands parse with the real CLI; the budget guard and the DALI check skip what they must."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from sslight_dali.bench.runs import flag_overrides
from sslight_dali.cli import build_parser
from sslight_dali.run_config import load_config

SCRIPT = Path("bench/gpu_session.sh")
PARTS = 3  # ../shared/gpu/stage-dali.sh makes 3 parts of DALI 2.4.0
KILL_GRACE = 5  # `timeout -k 5`: a command that ignores TERM ends 5 s after its limit
MEASURE = ["env", "gpu-tests", "pipeline", "train", "compare"]
EXTRA = ["train-compiled", "tune", "demo", "profile", "pipeline-more", "torchvision"]


def bash(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def plan() -> tuple[dict, float]:
    """The printed plan: {call: {carry, timeout_s, command, steps: [(name, minutes)]}}, and the total."""
    out = bash(str(SCRIPT), "plan")
    assert out.returncode == 0, out.stderr
    calls, total, k = {}, None, None
    for line in out.stdout.splitlines():
        if m := re.match(r"call (\d+)  carry (\[.*\])  timeout_s (\S+)$", line):
            k = int(m[1])
            calls[k] = {"carry": json.loads(m[2]), "timeout_s": m[3], "steps": []}
        elif m := re.match(r"  command: (.*)$", line):
            calls[k]["command"] = m[1]
        elif m := re.match(r"  (\S+) +(\d+\.\d) min  ", line):
            calls[k]["steps"].append((m[1], float(m[2])))
        elif m := re.match(r"total (\d+\.\d) min", line):
            total = float(m[1])
    return calls, total


def dry(*steps: str, budget: int | None = None, out: Path | None = None) -> subprocess.CompletedProcess:
    args = ["--dry-run"] + (["--out", str(out)] if out else []) + list(steps)
    return bash(str(SCRIPT), *args, env={"BUDGET_S": str(budget)} if budget else None)


def limits(stdout: str) -> list[tuple[str, int]]:
    """(step, seconds) of every command the dry run would run, in order."""
    got, step = [], None
    for line in stdout.splitlines():
        if m := re.match(r"=== (\S+) \(", line):
            step = m[1]
        elif m := re.match(r"\+ timeout (\d+) ", line):
            got.append((step, int(m[1])))
    return got


def test_the_plan_fits_the_lease():
    assert bash("-n", str(SCRIPT)).returncode == 0
    calls, total = plan()
    assert sorted(calls) == [1, 2, 3, 4, 5]
    counted = [m for k in (1, 2, 3, 4) for _, m in calls[k]["steps"]]
    assert all(m > 0 for m in counted)
    assert total is not None and abs(total - sum(counted)) < 0.05 and total <= 13
    # start-up paid once, by the first call; a transfer in each; the idle wait between calls
    assert [n for n, _ in calls[1]["steps"]] == ["start-up", "transfer", "prep"]
    assert all([n for n, _ in calls[k]["steps"]][:2] == ["idle", "transfer"] for k in (2, 3, 4))
    assert [n for n, _ in calls[4]["steps"]][2:] == MEASURE  # in this order, correctness first
    assert [n for n, _ in calls[5]["steps"]] == EXTRA
    assert dict(calls[1]["steps"])["start-up"] >= 2


def test_each_call_carries_one_dali_part_in_order():
    calls, _ = plan()
    carried = [p for k in sorted(calls) for p in calls[k]["carry"]]
    assert carried == [f".dali-p{i}" for i in range(PARTS)]  # each part once, back to back from call 1
    for k, call in calls.items():
        if k <= PARTS:
            assert call["carry"] == [f".dali-p{k - 1}"]
            assert call["command"].startswith(f"bash .dali-p{k - 1}/unpack.sh && export PYTHONPATH=/tmp/site:$PWD;")
        else:
            assert call["carry"] == [] and call["command"].startswith("export PYTHONPATH=/tmp/site:$PWD;")
        # what follows runs: the script's own part of the command, as a dry run
        script = shlex.split(call["command"].split(";", 1)[1].replace("<budget_left_s - 60>", "300"))
        assert script[-3:-1] == ["bash", str(SCRIPT)]
        assert dry(script[-1]).returncode == 0
    # the measurement call: the device tool's limit is the 8 minutes
    assert int(calls[4]["timeout_s"]) <= 480 and calls[4]["command"].endswith("gpu_session.sh measure")


def test_the_measurement_command_ends_within_8_minutes():
    calls, _ = plan()
    out = dry("measure")
    assert out.returncode == 0, out.stderr
    got = limits(out.stdout)
    assert [s for s in dict.fromkeys(s for s, _ in got)] == MEASURE
    assert "skipped" not in out.stdout  # the default budget runs every step
    worst = sum(t + KILL_GRACE for _, t in got)
    assert worst <= 480 and worst <= int(calls[4]["timeout_s"])
    # each step's expected minutes fit inside its commands' limits (else the plan expects a cut step)
    expected = dict(calls[4]["steps"])
    for step in MEASURE:
        assert expected[step] * 60 <= sum(t for s, t in got if s == step), step


def test_the_budget_guard_skips_what_cannot_fit():
    every = limits(dry("extra", budget=10**6).stdout)
    assert len(every) >= 10
    for budget in (100, 200, 333):
        out = dry("extra", budget=budget)
        assert out.returncode == 0
        # independently: a command runs iff its limit fits in what the ones run so far leave
        want, spent = [], 0
        for step, t in every:
            if t <= budget - spent:
                want.append((step, t))
                spent += t
        assert limits(out.stdout) == want
        skipped = [line for line in out.stdout.splitlines() if line.startswith("skipped: ")]
        assert len(skipped) == len(every) - len(want) > 0
        assert out.stdout.count("--- skipped: needs ") == len(skipped)


def test_dry_run_commands_parse_with_the_real_cli(tmp_path):
    out = dry("prep", "stage", "measure", "extra", budget=10**6, out=tmp_path)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
    ran = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("=== ") and "done" not in line]
    assert ran == ["prep", "stage"] + MEASURE + EXTRA
    commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ timeout")]
    cli = [c[c.index("sslight_dali.cli") + 1:] for c in commands if "sslight_dali.cli" in c]
    tests = [c[c.index("pytest") + 1:] for c in commands if "pytest" in c]
    assert tests == [["-q", "-p", "no:cacheprovider", "tests/data/test_gpu.py", "tests/data/test_views.py", "-k", "gpu"]]
    assert all(Path(a).is_file() for a in tests[0] if a.startswith("tests/"))
    jsons, kinds = [], []
    for argv in cli:
        args = build_parser(argv[0]).parse_args(argv)  # argparse exits (SystemExit) on any unknown flag
        if argv[0] == "demo":
            kinds.append("demo")
            continue
        load_config(args.config, list(args.overrides) + flag_overrides(args))  # config file and overrides load
        assert args.json and Path(args.json).parent.parent == tmp_path, args.json
        jsons.append(Path(args.json).name)
        kinds.append(args.bench_command + ("-compiled" if "train.compile=true" in args.overrides else "")
                     + ("-profile" if getattr(args, "profile_ops", False) else ""))
    assert len(jsons) == len(set(jsons))  # no run overwrites another's record
    measured = kinds[:kinds.index("compare") + 1]
    assert measured == ["pipeline", "train", "train", "train", "compare"]
    assert set(kinds) >= {"train-compiled", "tune", "demo", "pipeline-profile"}
    configs = [Path(a).stem for c in cli[1:4] for a in c if a.endswith(".yaml")]
    assert configs == ["resnet18_sslight", "mobilenetv2_sslight", "vit_tiny_sslight"]
    compare = next(c for c in cli if c[:2] == ["bench", "compare"])
    assert compare[compare.index("--variants") + 1] == "dali:gpu,torchvision:cpu"
    assert compare[compare.index("--bench") + 1] == "train"
    assert compare[compare.index("--threads") + 1] == str(len(os.sched_getaffinity(0)))  # every core
    bad = dry("measure", "warp")
    assert bad.returncode == 2 and "unknown step 'warp'" in bad.stderr and bad.stdout == ""


def test_environment_record(tmp_path):
    # the env step for real (no GPU here): the record holds the versions and the decoder verdict
    out = bash(str(SCRIPT), "--out", str(tmp_path), "env", env={"PYTHON": sys.executable, "TAG": "cpu"})
    assert out.returncode == 0, out.stdout + out.stderr
    rec = json.loads((tmp_path / "cpu-env.json").read_text())
    assert rec["torch"] == torch.__version__ and rec["cuda"] == torch.version.cuda
    assert rec["cpu_cores_available"] == len(os.sched_getaffinity(0))
    assert {"gpu_name", "driver", "torchvision", "timm", "dali"} <= set(rec)
    hw = rec["hw_jpeg_decoder"]
    assert hw["dali_mixed_decoder"] is True and hw["hw_decoder_load"] == 0.65
    assert hw["hw_decoder_used"] is (torch.cuda.is_available() and hw["nvjpeg_hw_backend"]["available"] is True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-env.json", "cpu-session.log"]


def test_dali_steps_say_so_when_dali_does_not_import(tmp_path):
    hide = tmp_path / "hide" / "nvidia" / "dali"
    hide.mkdir(parents=True)
    (hide.parent / "__init__.py").write_text("")
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    # BUDGET_S=1: were the check to let a step through, the guard would skip its commands, not run them
    out = bash(str(SCRIPT), "--out", str(tmp_path / "out"), "pipeline", "train",
               env={"PYTHON": sys.executable, "TAG": "cpu", "PYTHONPATH": str(tmp_path / "hide"), "BUDGET_S": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("!!!")] == ["!!! pipeline skipped",
                                                                              "!!! train skipped"]
    assert not any(line.startswith(("+ timeout", "--- skipped")) for line in lines)
    assert list((tmp_path / "out").iterdir()) == []
