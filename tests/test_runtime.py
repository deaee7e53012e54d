"""The shared helpers: one device vocabulary (old spelling still read), one dtype map, one atomic write."""
import pytest
import torch

from sslight_dali.config import ConfigError, to_dict
from sslight_dali.run_config import config_from_dict, load_config
from sslight_dali.files import atomic_write
from sslight_dali.runtime import autocast_dtype, resolve_precision, torch_dtype

CONFIG = "configs/dino/resnet18_sslight.yaml"


def test_devices_are_gpu_cpu_auto_and_cuda_still_reads_as_gpu():
    cfg = load_config(CONFIG, ["train.device=cuda", "data.device=cuda"])
    assert (cfg.train.device, cfg.data.device) == ("gpu", "gpu")
    assert load_config(CONFIG, ["train.device=gpu"]).train.device == "gpu"
    # A config stored in an older checkpoint said train.device: cuda.
    saved = to_dict(load_config(CONFIG))
    saved["train"]["device"] = "cuda"
    assert config_from_dict(saved).train.device == "gpu"
    with pytest.raises(ConfigError, match="train.device"):
        load_config(CONFIG, ["train.device=tpu"])


def test_one_dtype_map_for_precisions_and_data_dtypes():
    assert [torch_dtype(n) for n in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")] == \
        [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16, torch.float16]
    assert torch_dtype(torch.float16) is torch.float16
    assert (autocast_dtype("fp32"), autocast_dtype("bf16"), autocast_dtype("fp16")) == \
        (None, torch.bfloat16, torch.float16)


def test_bfloat16_images_need_a_mixed_precision_run():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    bf16 = ["data.dtype=bfloat16"]
    assert resolve_precision(load_config(CONFIG), cpu) == "fp32"
    assert resolve_precision(load_config(CONFIG), gpu) == "bf16"
    assert resolve_precision(load_config(CONFIG, bf16), cpu) == "bf16"  # auto follows the images on the CPU
    assert resolve_precision(load_config(CONFIG, bf16 + ["train.precision=fp16"]), gpu) == "fp16"
    with pytest.raises(ConfigError, match=r"data.dtype=bfloat16 needs train.precision=bf16, fp16 or auto"):
        load_config(CONFIG, bf16 + ["train.precision=fp32"])


def test_atomic_write_replaces_whole_file_or_leaves_old_one(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write(path, "old")
    assert path.read_text() == "old"
    atomic_write(path, b"new bytes", fsync=True)
    assert path.read_bytes() == b"new bytes"

    def half_then_fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"new bytes"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary file left behind
