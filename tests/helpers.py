"""What more than one test file uses: plain functions and constants, imported as `from helpers import ...`
(pytest.ini puts tests/ on the path). Fixtures live in the conftest.py files."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

from sslight_dali.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/dino/resnet18_sslight.yaml"


def assert_same_state(a, b, where=""):
    """torch.equal on every tensor of nested dicts/lists; == on everything else."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the trainer at toy size ------------------------------------------------------------------------
# Tiny crops and heads so a CPU step takes milliseconds; the recipe structure stays the config's.
TRAIN_TINY = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "train.batch_size=4",
              "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
              "swav.num_prototypes=16", "swav.hidden_dim=32", "moco.queue_length=64", "moco.hidden_dim=32",
              "data.num_threads=1", "train.knn_every=0", "train.log_every=1", "eval.resize=36", "eval.crop=32",
              "train.device=cpu", "data.device=cpu", "train.tensorboard=false"]


def tiny_cfg(path, data_root, out, *extra):
    return load_config(path, TRAIN_TINY + [f"data.root={data_root}", f"train.output_dir={out}", *extra])


def read_metrics(out: Path, kind="train") -> list[dict]:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


# --- `sslight bench` at toy size --------------------------------------------------------------------
BENCH_TINY = ["recipe.global.size=32", "recipe.local.size=16", "recipe.local.count=2", "dino.out_dim=256",
              "dino.hidden_dim=64", "dino.bottleneck_dim=32", "train.joint_linear_probe=false"]


# --- the DALI graph, read from a pipeline's serialized definition ------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        b = buf[i]
        i += 1
        x |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return x, i


def _fields(buf: bytes):
    """(field number, value) of one protobuf message, wire types 0, 1, 2 and 5."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        yield field, value


def _io(buf: bytes) -> tuple[str, str, bool]:
    """An InputOutput message: 1 name, 2 device, 3 is an argument input."""
    f = dict(_fields(buf))
    return f[1].decode(), f[2].decode(), bool(f.get(3, 0))


def graph(pipe) -> tuple[list[tuple[str, str, list, list]], list[tuple[str, str, bool]]]:
    """(operators, pipeline outputs) from one serialization. DALI's PipelineDef keeps its operators in
    field 5 (OpDef: 1 schema name, 2 inputs, 3 outputs, 4 arguments, among them "device"), each read
    as (schema name, device, inputs, outputs), and the pipeline's outputs in field 7."""
    ops, outputs = [], []
    for field, value in _fields(pipe.serialize()):
        if field == 7:
            outputs.append(_io(value))
        if field != 5:
            continue
        parts = list(_fields(value))
        args = [dict(_fields(a)) for f, a in parts if f == 4]
        device = next(a[5].decode() for a in args if a[1] == b"device")
        ops.append((dict(parts)[1].decode(), device, [_io(a) for f, a in parts if f == 2],
                    [_io(a) for f, a in parts if f == 3]))
    return ops, outputs


def op_names(pipe) -> list[str]:
    """Operator schema names, one per instance."""
    return [name for name, _, _, _ in graph(pipe)[0]]


def train_pipe(*overrides, debug=False, device="cpu"):
    """The training graph of CONFIG (with overrides), built but not run."""
    from sslight_dali.data.dali_views import ReaderSpec, train_pipeline  # DALI: only the graph tests need it
    cfg = load_config(CONFIG, list(overrides))
    return train_pipeline(ReaderSpec(files=["unused.jpg"], indices=[0]), cfg.recipe, device, True, 0.0, debug,
                          batch_size=2, num_threads=1, device_id=None)
