"""bench/gpu_session.sh on the CPU: its syntax, its plan, and every command its dry run prints parses
against the real CLI (flags, config files and overrides), each writing its own file under --out."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from sslight_dali.bench.runs import flag_overrides
from sslight_dali.cli import build_parser
from sslight_dali.config import load_config

SCRIPT = Path("bench/gpu_session.sh")
ALL = ["stage", "call1", "call2", "call3", "torchvision", "model"]


def bash(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60)


def test_syntax_and_plan():
    assert bash("-n", str(SCRIPT)).returncode == 0
    plan = bash(str(SCRIPT), "plan")
    assert plan.returncode == 0
    steps = [line.split()[0] for line in plan.stdout.splitlines()[1:12]]
    assert steps == ["stage", "tests", "pipeline", "compare", "train", "train-compiled", "tune", "profile", "demo",
                     "torchvision", "model"]
    bad = bash(str(SCRIPT), "--dry-run", "call1", "warp")
    assert bad.returncode == 2 and "unknown step 'warp'" in bad.stderr and bad.stdout == ""


def test_dry_run_commands_parse_with_the_real_cli(tmp_path):
    out = bash(str(SCRIPT), "--dry-run", "--out", str(tmp_path), *ALL)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
    ran = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("=== ") and "done" not in line]
    assert ran == ["stage", "tests", "pipeline", "compare", "train", "train-compiled", "tune", "profile", "demo",
                   "torchvision", "model"]  # the three calls and the staging steps cover every step
    commands = [shlex.split(line[2:].split(" > ")[0]) for line in out.stdout.splitlines() if line.startswith("+ timeout")]
    cli = [c[c.index("sslight_dali.cli") + 1:] for c in commands if "sslight_dali.cli" in c]
    tests = [c[c.index("pytest") + 1:] for c in commands if "pytest" in c]
    assert [t for t in tests if t[-2:] != ["-k", "gpu"]] and all(Path(a).is_file() for t in tests for a in t
                                                                 if a.startswith("tests/"))
    jsons, kinds = [], set()
    for argv in cli:
        args = build_parser(argv[0]).parse_args(argv)  # argparse exits (SystemExit) on any unknown flag
        if argv[0] == "demo":
            kinds.add("demo")
            continue
        kinds.add(args.bench_command)
        load_config(args.config, list(args.overrides) + flag_overrides(args))  # config file and overrides load
        assert args.json and Path(args.json).parent.parent == tmp_path, args.json
        jsons.append(Path(args.json).name)
        if "train.compile=true" in args.overrides:
            kinds.add(f"{args.bench_command}-compiled")
    assert kinds >= {"pipeline", "model", "model-compiled", "train", "train-compiled", "compare", "tune", "demo"}
    assert len(jsons) == len(set(jsons)) == 21  # no run overwrites another's record
    compare = next(c for c in cli if c[:2] == ["bench", "compare"])
    assert compare[compare.index("--variants") + 1] == "dali:gpu,torchvision:cpu"
    assert any(c[:2] == ["bench", "pipeline"] and "--profile-ops" in c for c in cli)
