"""The static type check that `make test` runs: mypy (pinned in requirements.txt) on the files mypy.ini
names (the config schema, the op table, the methods). Every config field is declared in source, so
each access (`cfg.dino.teacher_temp`, `recipe.augment.hue`) is checked against its dataclass."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def mypy(*args: str) -> subprocess.CompletedProcess:
    # The cache (.mypy_cache, git-ignored) makes a repeat run take seconds; the first reads torch's types.
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_mypy_accepts_the_schema_the_op_table_and_the_methods():
    res = mypy()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "Success" in res.stdout


@pytest.mark.slow
def test_mypy_sees_each_methods_section_and_each_ops_knobs(tmp_path):
    # The same check rejects a misspelt field and another method's section: the fields are real to it.
    code = ("from sslight_dali.methods.dino import DinoConfig\n"
            "from sslight_dali.run_config import load_config\n"
            "cfg = DinoConfig()\n"
            "ok: float = cfg.dino.teacher_temp + cfg.recipe.augment.hue + cfg.recipe.global_.blur_p[0]\n"
            "cfg.dino.teacher_tmp\n"
            "cfg.swav\n"
            "cfg.recipe.augment.hues\n"
            "load_config().dino\n")
    (tmp_path / "accesses.py").write_text(code)
    res = mypy(str(tmp_path / "accesses.py"))
    errors = [ln for ln in res.stdout.splitlines() if ": error:" in ln]
    assert [ln.split(":")[1] for ln in errors] == ["5", "6", "7", "8"], res.stdout
    assert '"DinoCfg" has no attribute "teacher_tmp"' in errors[0] and '"swav"' in errors[1], errors
    assert '"Augment" has no attribute "hues"' in errors[2] and '"Config" has no attribute "dino"' in errors[3], errors
