#!/usr/bin/env bash
# GPU checks that CI cannot run (no GPU there): the environment, the GPU tests, and a short
# DINO-SSLight ResNet18 run on the DALI GPU pipeline (bf16, channels-last). Writes under $OUT.
# Usage (GPU machine, DALI installed):  OUT=bench/results/h100 bash bench/gpu_checks.sh [steps]
set -uo pipefail
OUT=${OUT:-runs/gpu_checks}
STEPS=${1:-200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 - > "$OUT/env.json" <<'PY'
import json, platform, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": __import__("os").cpu_count(),
        "platform": platform.platform()}
try:
    import nvidia.dali as dali; info["dali"] = dali.__version__
except Exception as e:
    info["dali"] = f"not importable: {e}"
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["driver"] = open("/proc/driver/nvidia/version").readline().strip()
    except OSError:
        pass
print(json.dumps(info, indent=2))
PY
cat "$OUT/env.json"
python3 -m pytest -q -p no:cacheprovider tests/test_data_gpu.py 2>&1 | tail -25 | tee "$OUT/pytest_gpu.log"
DATA=/tmp/sslight_synth
[ -f $DATA/synth.json ] || python3 -m sslight_dali.cli data synth --out $DATA --classes 10 --per-class 400 \
    --val-per-class 30 --min-side 350 --max-side 500 --quality 95 --workers 16 > /dev/null
python3 -m sslight_dali.cli train configs/dino/resnet18_sslight.yaml data.root=$DATA \
    train.output_dir=/tmp/run_r18 train.max_steps=$STEPS train.log_every=10 train.knn_every=0 \
    train.tensorboard=false data.num_threads=8 2>&1 | grep -v "^\s*$" | tail -30 | tee "$OUT/train_r18.log"
cp /tmp/run_r18/metrics.jsonl "$OUT/train_r18_metrics.jsonl" 2>/dev/null || true
