"""What more than one test file uses: plain functions and constants, imported as `from helpers import ...`
(pytest.ini puts tests/ on the path). Fixtures live in the conftest.py files."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
from torch import nn

from sslight_dali import checkpoint as ckpt
from sslight_dali.cli import main
from sslight_dali.config import to_dict
from sslight_dali.methods import build_method
from sslight_dali.run_config import load_config

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


def cli_worker(rank, world, port, argv):
    """One rank of an `sslight ARGV` run under torch.multiprocessing.spawn (gloo on 127.0.0.1:port)."""
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert main(argv) == 0


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


# --- export: tiny checkpoints of every backbone, built without training -------------------------------
# (config, backbone prefix of the student, of the teacher): every method and backbone appears once.
CASES = {
    "resnet18": ("configs/dino/resnet18_sslight.yaml", "student.backbone.", "teacher.backbone."),
    "resnet34": ("configs/swav/resnet34_sslight.yaml", "network.backbone.", "network.backbone."),
    "mobilenetv2_100": ("configs/moco/mobilenetv2_sslight.yaml", "encoder_q.backbone.", "encoder_k.backbone."),
    "vit_tiny_patch16_224": ("configs/dino/vit_tiny_sslight.yaml", "student.backbone.", "teacher.backbone."),
}
SIZE = {"vit_tiny_patch16_224": 224}  # the ViT's exported pos_embed is for 224 px; the CNNs take any size


@torch.no_grad()
def tiny_checkpoint(path, config):
    cfg = load_config(config, ["dino.out_dim=256", "dino.hidden_dim=64", "swav.num_prototypes=32", "swav.hidden_dim=64",
                               "moco.queue_length=64", "moco.hidden_dim=64"])
    torch.manual_seed(0)
    method = build_method(cfg, 0)
    for m in method.modules():  # BN statistics away from (0, 1), so a mis-mapped buffer changes the output
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
    for name, p in method.named_parameters():  # a teacher that is not the student
        if name.startswith(("teacher.", "encoder_k.")):
            p.add_(torch.randn_like(p) * 0.01)
    ckpt.save_atomic({"model": method.state_dict(), "config": to_dict(cfg), "epoch": 3, "step": 42}, path)
    return path


def run(*argv):
    return main([str(a) for a in argv])


def listing(d):
    return sorted(p.name for p in d.iterdir())


@torch.no_grad()
def features(model, size, seed=0):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return model.eval()(x)
