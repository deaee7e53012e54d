"""Process and device set-up shared by training, the benchmarks, evaluation and the demo.

Devices are named "gpu", "cpu" or "auto" in configs and on the command line (`train.device`,
`data.device`, `sslight bench --device`); torch's name for the GPU, "cuda", is accepted as the same
thing, so older configs and checkpoints still load. Precisions are "bf16", "fp16", "fp32" (and
"auto"), data dtypes "bfloat16" and "float32"; `torch_dtype` reads either spelling.
"""
from __future__ import annotations

import datetime
import os
import pickle
import random
import threading
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from .backbones import backbone_entry

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name_or_dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' -> torch.bfloat16, and so on; a torch.dtype passes through."""
    if isinstance(name_or_dtype, torch.dtype):
        return name_or_dtype
    return _DTYPES[name_or_dtype]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    return None if precision == "fp32" else torch_dtype(precision)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on `device` with `dtype` (autocast_dtype's), a context that does nothing for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def is_distributed() -> bool:
    """Whether a torch.distributed process group is up (every collective is skipped otherwise)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def torch_device(kind: str) -> torch.device:
    """'gpu' (or 'cuda') -> this process's current CUDA device, with its index; anything else -> the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if kind in ("gpu", "cuda") else torch.device("cpu")


def init_distributed(cfg) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    use_cuda = cfg.train.device == "gpu" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("train.device=gpu but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # A bounded wait: a dead rank stops the others after dist_timeout_s instead of hanging them.
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.train.dist_timeout_s))
    return rank, world, device


def shutdown_distributed() -> None:
    """Tear the process group down at the end of a run (a no-op in a single process)."""
    if is_distributed():
        dist.destroy_process_group()


def on_rank0(work, poll_s: float):
    """work() run by rank 0 alone; its result, or its error, on every rank. The others wait however
    long it takes, yet no collective outlasts the process group's timeout (train.dist_timeout_s, the
    bound that stops a run whose rank died): while rank 0 works in a thread, every rank takes part in a
    one-number all_reduce every `poll_s` seconds. A rank 0 that dies still stops the others after the
    timeout, as in training."""
    rank, box, done = dist.get_rank(), [None, None], threading.Event()

    def run():
        try:
            box[0] = work()
        except Exception as e:  # sent to every rank; re-raised as is where it pickles
            try:
                pickle.dumps(e)
                box[1] = e
            except Exception:
                box[1] = RuntimeError(f"rank 0: {type(e).__name__}: {e}")
        finally:
            done.set()
    if rank == 0:
        threading.Thread(target=run, name="on_rank0", daemon=True).start()
    device = torch_device("gpu") if dist.get_backend() == "nccl" else None
    while True:
        flag = torch.tensor([1.0 if rank != 0 or done.wait(poll_s) else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 1.0:
            break
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_process(seed: int, device: torch.device) -> None:
    """Seed every RNG; on a GPU let cuDNN pick its fastest kernels (the loop's input shapes are fixed)."""
    seed_everything(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resolve_precision(cfg, device: torch.device) -> str:
    """train.precision with 'auto' resolved: bf16 on a GPU; on the CPU fp32, or bf16 when the images
    are bfloat16 (an fp32 network's first layer refuses them; validate() refuses an explicit fp32)."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" or cfg.data.dtype == "bfloat16" else "fp32"
    return p


def is_convnet(cfg) -> bool:
    return backbone_entry(cfg.model.backbone).family == "cnn"


def uses_channels_last(cfg) -> bool:
    """Channels-last pays off for the convnets only (ViT-Tiny gains nothing from it)."""
    return cfg.train.channels_last and is_convnet(cfg)
