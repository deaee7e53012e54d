"""`sslight_dali.data` without DALI: sources, errors and the torchvision backend work when
`nvidia.dali` cannot be imported (checked in a child process where an import hook hides it)."""
import json
import subprocess
import sys

HIDE_DALI = r"""
import json, sys

class HideDali:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, HideDali())
try:
    import nvidia.dali  # noqa: F401
    raise SystemExit("the hook did not hide nvidia.dali")
except ModuleNotFoundError:
    pass
"""

CHILD = HIDE_DALI + r"""
from sslight_dali.config import ConfigError
from sslight_dali.run_config import load_config
from sslight_dali.data import DataError, build_eval_loader, build_train_loader, list_samples

root = sys.argv[1]
base = [f"data.root={root}", "data.backend=torchvision", "data.device=cpu", "data.num_threads=1",
        "train.batch_size=4", "recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2",
        "eval.resize=40", "eval.crop=32", "eval.batch_size=4"]
cfg = load_config("configs/dino/resnet18_sslight.yaml", base)
out = {}
loader = build_train_loader(cfg, channels_last=False)
views, labels, index = next(iter(loader.epoch(0)))
out["train"] = [list(v.shape) for v in views] + [list(labels.shape), list(index.shape)]
images, labels, index = next(iter(build_eval_loader(cfg)))
out["eval"] = list(images.shape)
out["samples"] = len(list_samples(root, "train", check=False))
try:
    list_samples(root, "no_such_split")
except DataError as e:
    out["data_error"] = str(e)
try:
    build_train_loader(load_config("configs/dino/resnet18_sslight.yaml", base + ["data.backend=dali"]))
except ConfigError as e:
    out["dali_error"] = str(e)
out["dali_loaded"] = sorted(m for m in sys.modules if m.startswith("nvidia.dali"))
print(json.dumps(out))
"""


def test_data_package_works_without_dali(synth_root):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(synth_root)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["train"] == [[4, 3, 32, 32]] * 2 + [[4, 3, 16, 16]] * 2 + [[4], [4]]
    assert out["eval"] == [4, 3, 32, 32]
    assert out["samples"] == 32
    assert "no_such_split" in out["data_error"]
    assert "data.backend=dali" in out["dali_error"] and "DALI is not installed" in out["dali_error"]
    assert out["dali_loaded"] == []


# `sslight train` then `sslight eval semi` on the torchvision backend, in one process with DALI hidden.
CHILD_SEMI = HIDE_DALI + r"""
from pathlib import Path
from sslight_dali.cli import main

root, out = sys.argv[1], Path(sys.argv[2])
rc_train = main(["train", "configs/dino/resnet18_sslight.yaml", f"data.root={root}", "data.backend=torchvision",
                 "data.device=cpu", "train.device=cpu", "data.num_threads=1", "train.batch_size=8",
                 "recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "dino.out_dim=64",
                 "dino.hidden_dim=32", "dino.bottleneck_dim=16", "eval.resize=40", "eval.crop=32",
                 "eval.batch_size=8", "train.knn_every=0", "train.tensorboard=false", "train.max_steps=1",
                 f"train.output_dir={out / 'run'}"])
rc_semi = main(["eval", "semi", str(out / "run" / "checkpoint.pt"), "epochs=1", "batch_size=4",
                "data.backend=torchvision", "--subset", "10", "--out", str(out / "semi")])
result = json.loads((out / "semi" / "eval_semi.json").read_text()) if rc_semi == 0 else {}
print(json.dumps({"rc": [rc_train, rc_semi], "subset_images": result.get("subset_images"),
                  "complete": result.get("complete"),
                  "dali_loaded": sorted(m for m in sys.modules if m.startswith("nvidia.dali"))}))
"""


def test_eval_semi_works_without_dali(synth_root, tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD_SEMI, str(synth_root), str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rc"] == [0, 0], proc.stderr[-3000:]
    # 10 % of 8 images per class, at least one: one image from each of the 4 classes.
    assert out["subset_images"] == 4 and out["complete"]
    assert out["dali_loaded"] == []
