"""Shared fixtures: a tiny synthetic ImageFolder and configs pointing at it."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

from sslight_dali.run_config import load_config
from sslight_dali.synth import synth_dataset

CONFIG = "configs/dino/resnet18_sslight.yaml"

# The file-check verdict cache (data.verify_cache=auto) goes under $XDG_CACHE_HOME: keep the tests'
# verdicts out of the user's ~/.cache (child processes inherit this too).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sslight-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# Perturbation runs: SSLIGHT_TEST_THREADS=1 (or 2, ...) runs the suite with that many torch threads,
# which changes the order of float reductions; no test's outcome may depend on it (README, Tests).
if os.environ.get("SSLIGHT_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["SSLIGHT_TEST_THREADS"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["SSLIGHT_TEST_THREADS"]  # the child processes tests start


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """4 classes x 8 train (+ 3 val) JPEGs, sides 64-160 px."""
    root = tmp_path_factory.mktemp("synth")
    synth_dataset(root, classes=4, per_class=8, val_per_class=3, seed=0, min_side=64, max_side=160)
    return root


@pytest.fixture
def make_cfg(synth_root):
    """make_cfg(*overrides, root=None): the DINO-SSLight config on the tiny dataset, small views, CPU."""
    def make(*overrides, root=None):
        base = [f"data.root={root or synth_root}", "data.device=cpu", "data.num_threads=2", "train.batch_size=8",
                "recipe.global.size=32", "recipe.local.size=16", "eval.resize=40", "eval.crop=32", "eval.batch_size=8"]
        return load_config(CONFIG, base + list(overrides))
    return make


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 classes x 8 train (+4 val) images of 40-64 px: the trainer tests' dataset."""
    root = tmp_path_factory.mktemp("tiny_synth")
    synth_dataset(root, classes=4, per_class=8, val_per_class=4, min_side=40, max_side=64)
    return root


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the package, the shipped configs and recipes in tmp_path/repo, to apply a change to
    as README's "Where a change goes" says, and `run(*argv)` there: python with that copy first on the
    path (its exit status, output)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    dst = tmp_path / "repo"
    for part in ("sslight_dali", "configs", "pipelines"):
        shutil.copytree(repo / part, dst / part, ignore=shutil.ignore_patterns("__pycache__"))

    def run(*argv, timeout=600):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(dst), *filter(None, [os.environ.get("PYTHONPATH")])])}
        return subprocess.run([sys.executable, *argv], cwd=dst, env=env, capture_output=True, text=True,
                              timeout=timeout)
    return dst, run
