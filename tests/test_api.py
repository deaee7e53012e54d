"""The Python API (sslight_dali.api): importing it stays light, the README's example runs as written and
returns what the commands write, overrides are a dict of dotted keys taken as typed, errors are raised
(not exits), and the command line calls these functions."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslight_dali import api
from sslight_dali.cli import main
from sslight_dali.config import ConfigError
from sslight_dali.run_config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_importing_the_api_imports_neither_torch_nor_dali():
    code = ("import sys, sslight_dali, sslight_dali.api; "
            "print(sorted(m for m in ('torch', 'nvidia.dali', 'timm', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def readme_example() -> str:
    """The first python block of the README's 'Python API' section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Python API\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import timm
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), scope)  # noqa: S102  the README's own code
    knn, emb, backbone = scope["knn"], scope["emb"], scope["backbone"]
    assert knn == json.loads(Path("runs/toy/eval_knn/eval_knn.json").read_text())  # what the command wrote
    assert scope["run"]["steps"] == 2 and knn["val_images"] == emb["images"] == 16
    with __import__("numpy").load("shapes_val.npz") as z:
        assert z["features"].shape == (16, 512) and len(z["paths"]) == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hub = timm.create_model("local-dir:export/toy-r18", pretrained=True).eval()
        torch.testing.assert_close(backbone(x), hub(x), atol=1e-5, rtol=0)
        ours = api.load_backbone(scope["checkpoint"])
        torch.testing.assert_close(backbone(x), ours(x), atol=0, rtol=0)
    assert f"{knn['top1']} 16 512" in capsys.readouterr().out.splitlines()  # the example's print


def test_overrides_are_a_dict_of_dotted_keys_taken_as_typed(tmp_path):
    strings = api.override_strings({"data.root": "/data/set #2: yes", "train.batch_size": 64,
                                    "recipe.global.scale": [0.3, 1.0],
                                    "resume": "auto", "train.output_dir": tmp_path, "train.tensorboard": False})
    cfg = load_config("dino/resnet18_sslight", strings)
    assert cfg.data.root == "/data/set #2: yes"  # a string stays a string (YAML would cut it at ' #')
    assert cfg.train.batch_size == 64 and list(cfg.recipe.global_.scale) == [0.3, 1.0]
    assert cfg.train.resume == "auto" and cfg.train.output_dir == str(tmp_path) and cfg.train.tensorboard is False
    assert api.override_strings(["train.batch_size=8"]) == ["train.batch_size=8"]  # the command line's own
    with pytest.raises(TypeError, match="a dict"):
        api.override_strings("train.batch_size=8")


def test_errors_are_raised_with_the_commands_one_line(tmp_path):
    from sslight_dali.export import ExportError
    with pytest.raises(ConfigError, match="did you mean 'dino/resnet18_sslight'"):
        api.train("dino/resnet18_sslite")
    with pytest.raises(ConfigError, match="unknown key 'train.batchsize'"):
        api.train("dino/resnet18_sslight", {"train.batchsize": 8})
    with pytest.raises(ExportError, match="--format must be one of"):
        api.export(tmp_path / "x.pt", "tflite", tmp_path / "out")
    with pytest.raises(ConfigError, match="eval kind must be one of"):
        api.evaluate("probe", tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="x.pt"):
        api.embed(tmp_path / "x.pt", tmp_path, tmp_path / "e.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, function, expect", [
    (["train", "dino/resnet18_sslight", "train.batch_size=8"], "train",
     ("dino/resnet18_sslight", ["train.batch_size=8"])),
    (["eval", "knn", "c.pt", "eval.knn_k=5"], "evaluate", ("knn", "c.pt", ["eval.knn_k=5"], "", "student", None)),
    (["eval", "semi", "c.pt", "--subset", "10"], "evaluate", ("semi", "c.pt", [], "", "student", "10")),
    (["export", "c.pt", "--out", "o.pth", "--format", "timm"], "export",
     ("c.pt", "timm", "o.pth", "student", None, False)),
    (["embed", "c.pt", "--out", "e.npz", "data.root=d"], "embed",
     ("c.pt", None, "e.npz", ["data.root=d"], "val", "student")),
])
def test_the_command_line_calls_the_api(argv, function, expect, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(api, function, lambda *a: calls.append(a) or {"format": "timm"})
    assert main(argv) == 0
    assert calls == [expect]
