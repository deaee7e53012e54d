"""Configs and recipes by name or path, from any folder; and the package installed from a wheel,
outside the repository, runs `sslight config show` and a few training steps with the shipped files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sslight_dali.config import ConfigError, to_dict
from sslight_dali.run_config import load_config

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ names
def test_name_and_repository_path_give_the_same_config(tmp_path, monkeypatch):
    by_path = to_dict(load_config(REPO / "configs/swav/resnet18_sslight.yaml"))
    monkeypatch.chdir(tmp_path)  # the old relative paths work from any folder too
    for ref in ("swav/resnet18_sslight", "configs/swav/resnet18_sslight.yaml", "swav/resnet18_sslight.yaml"):
        assert to_dict(load_config(ref)) == by_path, ref
    cfg = load_config("dino/resnet18_sslight", ["data.recipe=pipelines/vit_sslight.yaml"])
    assert cfg.recipe.name == "vit_sslight" and cfg.recipe.local.count == 10
    assert load_config("dino/resnet18_sslight", ["data.recipe=swav_baseline"]).recipe.augment.hue == 0.2


def test_a_users_file_names_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("_base: cnn_baseline\nname: mine\nlocal: {count: 4}\n")
    (tmp_path / "run.yaml").write_text("_base: dino/resnet34_baseline\ndata: {recipe: recipes/mine.yaml}\n"
                                       "optim: {base_lr: 0.1}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.model.backbone == "resnet34" and cfg.optim.base_lr == 0.1 and cfg.optim.min_lr == 0.0048
    assert cfg.recipe.name == "mine" and cfg.recipe.local.count == 4 and cfg.recipe.local.size == 96


def test_bad_names_and_bases_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: dino/resnet18_sslite \(did you mean "
                                          r"'dino/resnet18_sslight'\?\)"):
        load_config("dino/resnet18_sslite")
    (tmp_path / "a.yaml").write_text("_base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base: a.yaml\n")
    with pytest.raises(ConfigError, match="a.yaml: _base: .*b.yaml: _base: .*a.yaml: _base: the chain of bases "
                                          "comes back to this file"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base: {method: dino}\n")
    with pytest.raises(ConfigError, match="c.yaml: _base: expected a name or path"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("data: {recipe: cnn_sslite}\n")
    with pytest.raises(ConfigError, match=r"data.recipe: config file not found: cnn_sslite \(did you mean "
                                          r"'cnn_sslight'\?\)"):
        load_config(tmp_path / "d.yaml")


# ------------------------------------------------------------------------------------------ wheel
def _copy_sources(dst: Path) -> None:
    """What a clean clone holds for building (no build/, egg-info or caches from this checkout)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("setup.py", "MANIFEST.in", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, dst / name)
    for name in ("sslight_dali", "configs", "pipelines"):
        shutil.copytree(REPO / name, dst / name, ignore=skip)


@pytest.mark.slow
def test_wheel_installed_elsewhere_runs_the_shipped_configs(tmp_path, tiny_data):
    src, wheels, site, work = (tmp_path / d for d in ("src", "wheels", "site", "work"))
    for d in (src, work):
        d.mkdir()
    _copy_sources(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run(pip + ["install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    assert (site / "sslight_dali/configs/dino/resnet18_sslight.yaml").is_file()
    assert (site / "sslight_dali/pipelines/cnn_sslight.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}

    def sslight(*args) -> str:
        res = subprocess.run([sys.executable, "-m", "sslight_dali.cli", *args], cwd=work, env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    shown = sslight("config", "show", "dino/resnet18_sslight")
    assert "name: cnn_sslight" in shown and "size: 128" in shown and "out_dim: 4096" in shown
    where = sslight("config", "show", "configs/dino/resnet18_sslight.yaml", "train.output_dir=x")  # old path
    assert where.replace("output_dir: x", "output_dir: runs/dino_resnet18_sslight") == shown
    tiny = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=4",
            "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.num_threads=1",
            "train.knn_every=0", "train.log_every=1", "train.device=cpu", "data.device=cpu",
            "train.tensorboard=false", "train.max_steps=2", f"data.root={tiny_data}", "train.output_dir=run"]
    out = sslight("train", "dino/resnet18_sslight", *tiny).splitlines()
    result = json.loads("\n".join(out[out.index("{"):]))  # the summary after the log lines
    assert result["steps"] == 2
    assert (work / "run/checkpoint.pt").is_file()
    records = [json.loads(line) for line in open(work / "run/metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    # the run used the installed package, not this checkout
    code = "import sslight_dali; print(sslight_dali.__file__)"
    origin = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert origin.stdout.strip().startswith(str(site))
