#!/usr/bin/env bash
# Every GPU figure of bench/README.md in one session, one step per name, correctness before speed.
#
#   bash bench/gpu_session.sh plan                      the steps, their expected minutes, the calls
#   bash bench/gpu_session.sh [--dry-run] [--out DIR] STEP [STEP...]
#
# Run from the repository root on a GPU machine (python3 with torch, torchvision, timm; DALI from
# `stage`). Results go to DIR (default $OUT, else bench/results/gpu-session), named <tag>-<what>-<config>
# (tag: the GPU, e.g. h100; TAG=... to set it); more than 7 files from one invocation are packed into
# one <tag>-<steps>.tar.gz (a device call brings back at most 8 files). Each command runs under its own
# `timeout`, so one slow run cannot take the others with it; every step prints its wall time.
# --dry-run prints the commands instead of running them (no GPU needed; tests/test_gpu_session.py
# parses every printed `sslight` command with the real CLI).
set -uo pipefail

DRY=0
DIR=${OUT:-bench/results/gpu-session}
STEPS=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) DIR=$2; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "gpu_session.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) STEPS+=("$1") ;;
  esac
  shift
done
[ ${#STEPS[@]} -gt 0 ] || STEPS=(plan)

PY=${PYTHON:-python3}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
S="$PY -m sslight_dali.cli bench"
CORES=$(nproc)
THREADS=8   # DALI threads of the GPU pipeline (12 were no faster than 4 on the H100; `tune` checks)
M="--batch-size 128 --repeats 3"
R18=configs/dino/resnet18_sslight.yaml; MNV2=configs/dino/mobilenetv2_sslight.yaml; VIT=configs/dino/vit_tiny_sslight.yaml
stem() { basename "$1" .yaml; }
if [ -z "${TAG:-}" ]; then
  TAG=gpu
  [ $DRY = 1 ] || TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
                        | grep -oiE 'h100|h200|h20|gh200|a100|b200|l40s|l4|a10g' | head -1 | tr 'A-Z' 'a-z')
  TAG=${TAG:-gpu}
fi
NEW=$DIR/new-$$   # this invocation's files; moved up or packed at the end

# run SECONDS CMD...: one command under its own time limit; its last lines, without warnings
run() {
  local t=$1; shift
  echo "+ timeout $t $*"
  [ $DRY = 1 ] && return 0
  timeout "$t" "$@" 2>&1 | grep -vE "^\s*$|Warning|warn\(" | tail -14
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "!!! exit $rc (124 = over its ${t}s limit): $*"
}
# log SECONDS NAME CMD...: the same, with the full output saved as $NEW/$TAG-NAME.log
log() {
  local t=$1 name=$2; shift 2
  echo "+ timeout $t $* > $TAG-$name.log"
  [ $DRY = 1 ] && return 0
  timeout "$t" "$@" > "$NEW/$TAG-$name.log" 2>&1
  local rc=$?
  tail -25 "$NEW/$TAG-$name.log"
  [ "$rc" = 0 ] || echo "!!! exit $rc (124 = over its ${t}s limit): $*"
}
J() { echo "--json $NEW/$TAG-$1.json"; }

# ------------------------------------------------------------------------------------------------
# Steps. Minutes are estimates from the last H100 session's figures (start-up included).
# ------------------------------------------------------------------------------------------------
step_stage() {  # join and install the DALI wheels staged by ../shared/gpu/stage-dali.sh, one part per call
  local parts=${DALI_PARTS:-5}
  echo "+ copy .dali-p*/part-* to /tmp/dali-parts; with all $parts parts: install DALI into /tmp/site"
  [ $DRY = 1 ] && return 0
  mkdir -p /tmp/dali-parts
  cp -n .dali-p*/part-* /tmp/dali-parts/ 2>/dev/null
  local have; have=$(ls /tmp/dali-parts | wc -l)
  echo "DALI parts here: $have of $parts ($(ls /tmp/dali-parts | tr '\n' ' '))"
  if [ "$have" -ge "$parts" ] && ! PYTHONPATH=/tmp/site $PY -c "import nvidia.dali" 2>/dev/null; then
    rm -rf /tmp/dali /tmp/site && mkdir -p /tmp/dali  # a failed earlier install leaves pip --target a partial tree
    cat /tmp/dali-parts/part-* | tar -xf - -C /tmp/dali \
      && $PY -m pip install -q --no-index --no-deps --target /tmp/site /tmp/dali/*.whl 2>&1 | tail -3
  fi
  if PYTHONPATH=/tmp/site $PY -c "import nvidia.dali as d; print('DALI', d.__version__, 'importable')"; then
    export PYTHONPATH=/tmp/site:$PWD
  fi
}

step_tests() {  # correctness before speed: the environment, then the GPU tests
  echo "+ environment > $TAG-env.json"
  if [ $DRY = 0 ]; then
    $PY - > "$NEW/$TAG-env.json" <<'PY'
import json
from sslight_dali.bench import nvjpeg_hw_probe, static_environment
print(json.dumps({**static_environment(), "nvjpeg_hw_backend": nvjpeg_hw_probe()}, indent=2))
PY
    grep -E '"(gpu_name|driver|torch|dali|cuda)"|"available"' "$NEW/$TAG-env.json"
  fi
  log 240 pytest-data-gpu $PY -m pytest -q -p no:cacheprovider tests/test_data_gpu.py
  log 180 pytest-views-gpu $PY -m pytest -q -p no:cacheprovider tests/test_data_views.py -k gpu
}

step_pipeline() {  # the DALI GPU pipeline alone (its record holds cpu_ms_per_image: the CPU cost per image)
  for c in $R18 $VIT; do
    run 150 $S pipeline $c --device gpu --threads $THREADS $M --steps 30 --warmup 10 $(J pipeline-dali-gpu-dino_$(stem $c))
  done
  # ResNet18 with every JPEG on the hardware decoder (least CPU per image), and with 2 DALI threads
  # (the speed and CPU cost when the pipeline gets few cores)
  run 150 $S pipeline $R18 --device gpu --threads $THREADS --hw-decoder-load 1.0 $M --steps 30 --warmup 10 \
      $(J pipeline-dali-gpu-hw1-dino_$(stem $R18))
  run 150 $S pipeline $R18 --device gpu --threads 2 $M --steps 30 --warmup 10 $(J pipeline-dali-gpu-t2-dino_$(stem $R18))
}

step_train() {  # end to end beside the model ceiling (eager), DALI GPU pipeline
  for c in $R18 $MNV2 $VIT; do
    run 170 $S train $c --device gpu --threads $THREADS $M --steps 20 --warmup 12 $(J train-dino_$(stem $c))
  done
}

step_train_compiled() {  # the same with torch.compile (the model ceiling beside it is compiled too)
  for c in $R18 $MNV2 $VIT; do
    run 190 $S train $c train.compile=true --device gpu --threads $THREADS $M --steps 20 --warmup 12 \
        $(J train-compile-dino_$(stem $c))
  done
}

step_model() {  # the compute ceilings alone, eager and compiled (no DALI needed: fits a staging call)
  for c in $R18 $MNV2 $VIT; do
    run 90 $S model $c $M --steps 10 --warmup 5 $(J model-dino_$(stem $c))
    run 150 $S model $c train.compile=true $M --steps 20 --warmup 10 $(J model-compile-dino_$(stem $c))
  done
}

step_torchvision() {  # torchvision/PIL with every core as a DataLoader worker (no DALI needed)
  for c in $MNV2 $VIT; do
    run 200 $S train $c --backend torchvision --device cpu --threads $CORES $M --steps $((3 * CORES)) \
        --warmup $CORES $(J train-torchvision-cpu$CORES-dino_$(stem $c))
  done
}

step_compare() {  # DALI gpu vs torchvision (all cores), end to end, side by side in one invocation
  run 300 $S compare $R18 --bench train --variants dali:gpu,torchvision:cpu --threads $CORES $M \
      --steps $((3 * CORES)) --warmup $CORES $(J compare-train-dino_$(stem $R18))
}

step_tune() {  # the fastest threads / pipelines / prefetch / hardware-decoder share for the GPU pipeline
  run 300 $S tune $R18 --device gpu $M --steps 20 --warmup 8 $(J tune-dali-gpu-dino_$(stem $R18))
}

step_profile() {  # per-op cost of the GPU graph, by ablation
  run 240 $S pipeline $R18 --device gpu --threads $THREADS $M --steps 20 --warmup 8 --profile-ops \
      $(J profile-dali-gpu-dino_$(stem $R18))
}

step_demo() {  # `make demo`'s GPU branch (the Makefile runs `sslight demo`), its output kept
  log 420 demo $PY -m sslight_dali.cli demo --out /tmp/sslight-demo --data /tmp/sslight-demo-data
}

# name  minutes  needs-DALI  what
PLAN="stage            0.5  -    DALI wheels: copy the carried part; with the last part, install (one call per part)
tests            2    yes  environment + tests/test_data_gpu.py + tests/test_data_views.py -k gpu
pipeline         1.5  yes  DALI GPU pipeline alone: ResNet18, ViT-Tiny (+ R18 all-hw-decoder, 2 threads); CPU ms/image
compare          3    yes  ResNet18 end to end: dali:gpu vs torchvision:cpu (all cores), one compare
train            2    yes  end to end + model ceiling, eager: ResNet18, MobileNetV2, ViT-Tiny
train-compiled   5    yes  the same with train.compile=true (compile ~60 s per model)
tune             2    yes  bench tune, ResNet18 GPU pipeline: threads, pipelines, prefetch, hw decoder share
profile          1.5  yes  bench pipeline --profile-ops, ResNet18 GPU graph
demo             4    yes  sslight demo (make demo's GPU branch)
torchvision      3    -    end to end with torchvision, all cores: MobileNetV2, ViT-Tiny
model            4.5  -    model ceilings alone, eager and compiled, 3 backbones (optional: train's records hold both)"
# Calls of at most 10 minutes each; the DALI parts travel one per call (carry: [".dali-pN"]).
CALLS="call1=tests pipeline compare
call2=train train-compiled
call3=tune profile demo"

plan() {
  echo "Steps (expected minutes on an H100; each command also has its own timeout):"
  echo "$PLAN" | sed 's/^/  /'
  cat <<EOF
A session (30 min of device time, <= 10 min per call; the machine stays warm only ~30 s between calls):
  calls 1-5: carry .dali-p0 ... .dali-p4 one per call (after \`bash ../shared/gpu/stage-dali.sh\` here):
             bash bench/gpu_session.sh stage torchvision     (first call: DALI not needed yet)
             bash bench/gpu_session.sh stage                 (calls 2-4; \`stage model\` if time allows)
             bash bench/gpu_session.sh stage call1           (last part: install, then the first group)
             (stage-dali.sh says how many parts it made; if not 5, prefix each stage call with DALI_PARTS=n)
  call 6:    bash bench/gpu_session.sh call2
  call 7:    bash bench/gpu_session.sh call3
Groups: $(echo "$CALLS" | tr '\n' ';' | sed 's/;$//; s/;/; /g')
Results: \$OUT (or --out DIR); commit them to bench/results/<tag>-<date>/ (tar -xzf the packs there).
Every record has env: GPU, driver, torch, DALI, and env.hw_jpeg_decoder.hw_decoder_used.
EOF
}

expand() {  # group names -> steps
  local s g
  for s in "$@"; do
    g=$(echo "$CALLS" | sed -n "s/^$s=//p")
    if [ -n "$g" ]; then echo $g; else echo "$s"; fi
  done
}

names=$(echo "$PLAN" | awk '{print $1}')
todo=$(expand "${STEPS[@]}")
for s in $todo; do
  if [ "$s" != plan ] && ! echo "$names" | grep -qx "$s"; then
    echo "gpu_session.sh: unknown step '$s' (steps: $(echo $names), groups: call1 call2 call3, plan)" >&2
    exit 2
  fi
done
[ "$(echo $todo)" = plan ] && { plan; exit 0; }
[ $DRY = 1 ] || mkdir -p "$NEW"
for s in $todo; do
  if [ "$s" = plan ]; then plan; continue; fi
  echo "=== $s ($(echo "$PLAN" | awk -v s="$s" '$1 == s {print $2}') min expected) $(date -u +%H:%M:%S)"
  t0=$SECONDS
  "step_${s//-/_}"
  echo "=== $s done in $((SECONDS - t0)) s"
done

[ $DRY = 1 ] && exit 0
n=$(find "$NEW" -type f | wc -l)
if [ "$n" -gt 7 ]; then
  pack="$DIR/$TAG-$(echo $todo | tr ' ' '_').tar.gz"
  tar -czf "$pack" -C "$NEW" . && rm -rf "$NEW" && echo "packed $n files into $pack"
else
  mv "$NEW"/* "$DIR"/ 2>/dev/null; rmdir "$NEW" 2>/dev/null
  echo "wrote $n files to $DIR"
fi
ls -la "$DIR"
