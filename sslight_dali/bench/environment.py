"""Environment capture: versions, GPU, driver, CPU and the hardware JPEG decoder, for every record."""
from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

HW_JPEG_GPUS = re.compile(r"\b(A100|A800|A30|H100|H800|H200|H20|GH200|B200|GB200)\b")

_STATIC_ENV: dict = {}


def static_environment() -> dict:
    """Versions, GPU, driver, CPU: what does not change within a process (captured once)."""
    if _STATIC_ENV:
        return dict(_STATIC_ENV)
    import torch  # light: `sslight bench --help` loads no torch
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torchvision": _version("torchvision"), "timm": _version("timm"),
           "numpy": _version("numpy"), "pillow": _version("pillow"), **_dali_version(),
           "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_available": len(os.sched_getaffinity(0)),
           "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
           "gpu_name": None, "gpu_count": 0, "driver": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_bytes=int(props.total_memory),
                   gpu_compute_capability=f"{props.major}.{props.minor}", gpu_sm_count=props.multi_processor_count,
                   driver=nvidia_driver_version(), driver_cuda=_driver_cuda_version(),
                   cudnn=torch.backends.cudnn.version())
    _STATIC_ENV.update(env)
    return dict(env)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _dali_version() -> dict:
    # The wheel's name says its CUDA flavour (nvidia-dali-cuda120 / -cuda130).
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return {"dali": d.version, "dali_package": name}
    return {"dali": None, "dali_package": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver_version() -> str | None:
    """Kernel driver version from /proc (no nvidia-smi needed)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return m.group(1) if m else None


def _driver_cuda_version() -> str | None:
    """Highest CUDA version the driver supports, e.g. '13.0' (cuDriverGetVersion; best effort)."""
    try:
        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


def hw_decoder_info(cfg, result: dict) -> dict:
    """Whether this run's JPEGs went to the hardware decoder: DALI 'mixed' decoding (dali on gpu),
    hw_decoder_load > 0, and a GPU whose nvJPEG hardware backend opens."""
    mixed = result["backend"] == "dali" and result["device"] == "gpu"
    return {"hw_decoder_load": cfg.data.hw_decoder_load, "gpu_has_hw_jpeg_decoder": gpu_has_jpeg_engine(),
            "nvjpeg_hw_backend": nvjpeg_hw_probe(), "dali_mixed_decoder": mixed,
            "hw_decoder_used": bool(mixed and cfg.data.hw_decoder_load > 0 and hw_jpeg_decoder_available())}


def gpu_has_jpeg_engine() -> bool:
    """By name: the GPUs known to carry a hardware JPEG decoder."""
    name = static_environment()["gpu_name"]
    return bool(name and HW_JPEG_GPUS.search(name))


def hw_jpeg_decoder_available() -> bool:
    """Whether nvJPEG's hardware backend opens here; where it cannot be asked (no libnvjpeg found),
    whether the GPU is one known to have the engine. The probe decides when it answers: it also
    covers GPUs missing from the list, and Docker without the `video` capability."""
    probe = nvjpeg_hw_probe()["available"]
    return probe if probe is not None else gpu_has_jpeg_engine()


_NVJPEG_PROBE: dict = {}


def nvjpeg_hw_probe() -> dict:
    """Open nvJPEG's hardware backend (NVJPEG_BACKEND_HARDWARE = 3) directly: DALI reports nothing when
    it falls back to CUDA decoding, e.g. in Docker without the `video` GPU capability. `available` is
    None when it cannot be asked (no CUDA, no libnvjpeg found)."""
    if _NVJPEG_PROBE:
        return dict(_NVJPEG_PROBE)
    out = {"available": None, "status": None, "library": None}
    import torch  # light: `sslight bench --help` loads no torch
    if torch.cuda.is_available():
        for path in _nvjpeg_candidates():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            handle = ctypes.c_void_p()
            status = lib.nvjpegCreateEx(3, None, None, 0, ctypes.byref(handle))
            if status == 0:
                lib.nvjpegDestroy(handle)
            out = {"available": status == 0, "status": int(status), "library": path}
            break
    _NVJPEG_PROBE.update(out)
    return dict(out)


def _nvjpeg_candidates() -> list[str]:
    found = []
    for base in map(Path, sys.path):
        for pattern in ("nvidia/*/lib/libnvjpeg.so*", "nvidia/nvjpeg/lib/libnvjpeg.so*",
                        "torchvision.libs/libnvjpeg*.so*"):
            found += sorted(str(p) for p in base.glob(pattern))
    return found + ["libnvjpeg.so"]


