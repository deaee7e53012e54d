#!/usr/bin/env bash
# The GPU figures of bench/README.md inside one lease of the device machine: 15 minutes of device time
# in all (start-up, transfers, idle waits and failed tries count), <= 10 min and 64 MiB of files per
# call, and the machine goes back 30 s after a call ends, /tmp with it.
#
#   bash bench/gpu_session.sh plan                         the device calls: command, carry, timeout_s,
#                                                          each step's expected minutes and figures, total
#   bash bench/gpu_session.sh [--dry-run] [--out DIR] GROUP|STEP...
#
# Groups: measure (call 4: env gpu-tests pipeline train compare, <= 8 min), extra (call 5, only if
# time is left). Run from the repository root on the GPU machine (python3 with torch, torchvision,
# timm; DALI from the .dali-pK parts of ../shared/gpu/stage-dali.sh, unpacked into /tmp/site).
# Every command runs under its own `timeout`; BUDGET_S (default 440 s) is the whole invocation's
# guard: a command whose limit no longer fits in what is left is skipped and named. Results go to DIR
# (default $OUT, else bench/results/gpu-session) as <tag>-<what>-<config>.json, tag from the GPU
# (TAG=... to set it); more than 7 files are packed into one .tar.gz (a call brings back 8 at most).
# --dry-run prints the commands instead (no GPU; tests/bench/test_gpu_session.py parses them with the CLI).
set -uo pipefail

DRY=0
DIR=${OUT:-bench/results/gpu-session}
ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) DIR=$2; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "gpu_session.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
[ ${#ARGS[@]} -gt 0 ] || ARGS=(plan)

PY=${PYTHON:-python3}
# DALI unpacked by the .dali-pK calls (the device command usually exports this already)
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) [ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} ;; esac
export PYTHONUNBUFFERED=1
S="$PY -m sslight_dali.cli bench"
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS; we want the cores this process may use
PARTS=3      # DALI parts made by ../shared/gpu/stage-dali.sh (DALI 2.4.0, Python 3.12)
THREADS=8    # DALI threads of the GPU pipeline (`tune`, in the extra call, checks)
M="--batch-size 128 --repeats 3"
R18=configs/dino/resnet18_sslight.yaml; MNV2=configs/dino/mobilenetv2_sslight.yaml; VIT=configs/dino/vit_tiny_sslight.yaml
BUDGET_S=${BUDGET_S:-440}
stem() { basename "$1" .yaml; }
if [ -z "${TAG:-}" ]; then
  TAG=gpu
  [ $DRY = 1 ] || TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
                        | grep -oiE 'h100|h200|h20|gh200|a100|b200|l40s|l4|a10g' | head -1 | tr 'A-Z' 'a-z')
  TAG=${TAG:-gpu}
fi
NEW=$DIR/new-$$   # this invocation's files; moved up or packed at the end
SKIPPED=()
STEP=              # the step running (named when one of its commands is skipped)
LAST=/tmp/gpu_session-last-$$.log   # one command's output (outside $NEW: a call brings back 8 files)
SPENT=0           # dry run: seconds the commands so far may take (their limits)

# ------------------------------------------------------------------------------------------------
# Running one command: its own limit, inside the invocation's budget, output kept in a log
# ------------------------------------------------------------------------------------------------
elapsed() { if [ $DRY = 1 ]; then echo $SPENT; else echo $SECONDS; fi; }
show() {  # the command as printed: an inline script (several lines) shown as <script>
  local a out=()
  for a in "$@"; do [[ $a == *$'\n'* ]] && a="<script>"; out+=("$a"); done
  echo "${out[*]}"
}
label() {  # a command in a few words: the record it writes, else its first words
  local j; j=$(echo "$*" | grep -oE -- '--json [^ ]+' | sed 's/.*\///')
  [ -n "$j" ] && echo "$j" || show "$@" | cut -c1-70
}
# run SECONDS CMD...: skipped (and named) when SECONDS no longer fits in BUDGET_S; else run under
# `timeout` (-k: a pipeline that ignores TERM is killed 5 s later), its full output appended to
# $TAG-session.log and its last lines shown
run() {
  local t=$1; shift
  local left=$((BUDGET_S - $(elapsed)))
  if [ "$t" -gt "$left" ]; then
    echo "--- skipped: needs ${t}s, ${left}s of BUDGET_S left: $(show "$@")"
    SKIPPED+=("$STEP: $(label "$@")")
    return 0
  fi
  echo "+ timeout $t $(show "$@")"
  if [ $DRY = 1 ]; then SPENT=$((SPENT + t)); return 0; fi
  timeout -k 5 "$t" "$@" > "$LAST" 2>&1
  local rc=$?
  { echo "+ timeout $t $(show "$@")"; cat "$LAST"; } >> "$NEW/$TAG-session.log"
  grep -vE "^\s*$|Warning|warn\(" "$LAST" | tail -8
  [ "$rc" = 0 ] || echo "!!! exit $rc (124 = over its ${t}s limit): $(show "$@")"
}
J() { echo "--json $NEW/$TAG-$1.json"; }

DALI_OK=
# need_dali STEP: DALI steps start here; when DALI does not import, one line and the step is skipped
need_dali() {
  [ $DRY = 1 ] && return 0
  [ -n "$DALI_OK" ] || { $PY -c "import nvidia.dali" 2>/dev/null && DALI_OK=1 || DALI_OK=0; }
  [ "$DALI_OK" = 1 ] && return 0
  echo "!!! $1 skipped: DALI does not import (PYTHONPATH=${PYTHONPATH:-}); a fresh machine needs all $PARTS .dali-pK calls again"
  SKIPPED+=("$1 (no DALI)")
  return 1
}

# ------------------------------------------------------------------------------------------------
# Steps. What each yields is in PLAN below.
# ------------------------------------------------------------------------------------------------
step_prep() {  # call 1, no DALI needed: which GPU, and the bench set (data/ is kept between calls)
  run 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  run 90 $PY -c "from sslight_dali.bench.runs import ensure_bench_data; ensure_bench_data()"
}

step_stage() {  # calls 2-3: the parts unpack.sh has kept so far, and whether DALI imports yet
  echo "+ DALI parts in /tmp/dali-parts; import nvidia.dali"
  [ $DRY = 1 ] && return 0
  echo "DALI parts here: $(ls /tmp/dali-parts 2>/dev/null | wc -l) of $PARTS"
  $PY -c "import nvidia.dali as d; print('DALI', d.__version__, 'imports')" 2>/dev/null || echo "DALI does not import yet"
}

# The environment record: static_environment() (GPU, driver, CUDA, torch, torchvision, timm, DALI,
# cpu_cores_available = nproc) and hw_decoder_info() as every dali:gpu record of the config has it
# (hw_decoder_used: JPEGs go to the hardware decoder, nvJPEG's hardware backend opened).
ENV_PY='
import json, sys
from sslight_dali.bench.environment import hw_decoder_info, static_environment
from sslight_dali.run_config import load_config
rec = {**static_environment(), "hw_jpeg_decoder": hw_decoder_info(load_config(sys.argv[2]),
                                                                  {"backend": "dali", "device": "gpu"})}
open(sys.argv[1], "w").write(json.dumps(rec, indent=2) + "\n")
print({k: rec[k] for k in ("gpu_name", "driver", "cuda", "torch", "torchvision", "timm", "dali")}, "nproc", rec["cpu_cores_available"])
print("hardware JPEG decoder used:", rec["hw_jpeg_decoder"]["hw_decoder_used"], rec["hw_jpeg_decoder"]["nvjpeg_hw_backend"])
'
step_env() {
  run 30 $PY -c "$ENV_PY" "$NEW/$TAG-env.json" $R18
}

step_gpu_tests() {  # correctness before speed: one pytest process for both files (one start-up)
  run 65 $PY -m pytest -q -p no:cacheprovider tests/data/test_gpu.py tests/data/test_views.py -k gpu
}

step_pipeline() {  # the DALI GPU pipeline alone (its record holds cpu_ms_per_image)
  run 45 $S pipeline $R18 --device gpu --threads $THREADS $M --steps 30 --warmup 10 $(J pipeline-dali-gpu-dino_$(stem $R18))
}

step_train() {  # end to end beside the model ceiling, eager, DALI GPU pipeline
  local c t
  for c in $R18 $MNV2 $VIT; do
    t=50; [ $c = $MNV2 ] && t=100  # MobileNetV2's first steps (cuDNN's choice of kernels) are the slowest
    run $t $S train $c --device gpu --threads $THREADS $M --steps 15 --warmup 8 $(J train-dino_$(stem $c))
  done
}

step_compare() {  # DALI gpu vs torchvision with every core as a worker, end to end, in one process
  run 100 $S compare $R18 --bench train --variants dali:gpu,torchvision:cpu --threads $CORES $M \
      --steps $CORES --warmup $CORES $(J compare-train-dino_$(stem $R18))
}

step_train_compiled() {  # end to end with torch.compile (the ceiling beside it compiled too), R18 first
  local c t
  for c in $R18 $VIT $MNV2; do
    t=130; [ $c = $MNV2 ] && t=170
    run $t $S train $c train.compile=true --device gpu --threads $THREADS $M --steps 15 --warmup 8 \
        $(J train-compile-dino_$(stem $c))
  done
}

step_tune() {  # threads / pipelines / prefetch / decoder share of the ResNet18 GPU pipeline, 90 s of search
  run 150 $S tune $R18 --device gpu --threads $THREADS --quick --budget 90 --batch-size 128 --repeats 2 \
      --steps 20 --warmup 8 $(J tune-dali-gpu-dino_$(stem $R18))
}

step_demo() {  # `make demo`'s GPU branch (the Makefile runs `sslight demo`)
  run 360 $PY -m sslight_dali.cli demo --out /tmp/sslight-demo --data /tmp/sslight-demo-data
}

step_profile() {  # per-op cost of the GPU graph, by ablation
  run 180 $S pipeline $R18 --device gpu --threads $THREADS $M --steps 20 --warmup 8 --profile-ops \
      $(J profile-dali-gpu-dino_$(stem $R18))
}

step_pipeline_more() {  # ViT-Tiny's recipe; R18 with every JPEG on the hardware decoder; R18 on 2 threads
  run 45 $S pipeline $VIT --device gpu --threads $THREADS $M --steps 30 --warmup 10 $(J pipeline-dali-gpu-dino_$(stem $VIT))
  run 45 $S pipeline $R18 --device gpu --threads $THREADS --hw-decoder-load 1.0 $M --steps 30 --warmup 10 \
      $(J pipeline-dali-gpu-hw1-dino_$(stem $R18))
  run 45 $S pipeline $R18 --device gpu --threads 2 $M --steps 30 --warmup 10 $(J pipeline-dali-gpu-t2-dino_$(stem $R18))
}

step_torchvision() {  # torchvision/PIL with every core as a worker, end to end (no DALI needed)
  local c
  for c in $MNV2 $VIT; do
    run 100 $S train $c --backend torchvision --device cpu --threads $CORES $M --steps $CORES --warmup $CORES \
        $(J train-torchvision-cpu$CORES-dino_$(stem $c))
  done
}

# ------------------------------------------------------------------------------------------------
# The plan: one line per step, "call step minutes what -> figures". Minutes are estimates for one
# H200 (16 cores) from the H100 session's record times (bench/results/h100-*.json); the calls 1-4
# lines make the total, call 5 runs only if the lease has time left.
# ------------------------------------------------------------------------------------------------
PLAN="1 start-up       3.0  a fresh machine starts (the first call pays it)
1 transfer       0.3  working tree (~2 MiB) + .dali-p0 (58 MiB) out
1 prep           0.2  GPU/driver line; the synthetic bench set in data/bench_synth (kept for call 4)
2 idle           0.5  the turn-around between calls (the machine goes back 30 s after a call ends)
2 transfer       0.3  working tree + .dali-p1
2 stage          0.1  part 1 kept in /tmp/dali-parts -> 'DALI parts here: 2 of 3'
3 idle           0.5  between calls
3 transfer       0.3  working tree + .dali-p2
3 stage          0.3  all parts here: DALI unpacked into /tmp/site (~10 s) -> 'DALI 2.4.0 ready'
4 idle           0.5  between calls
4 transfer       0.2  working tree out, results back (one .tar.gz)
4 env            0.2  -> <tag>-env.json: GPU, driver, CUDA, torch, torchvision, timm, DALI, nproc, hw_decoder_used
4 gpu-tests      0.8  -> pass/fail: tests/data/test_gpu.py, tests/data/test_views.py -k gpu
4 pipeline       0.4  -> ResNet18 DALI GPU pipeline alone: img/s, cpu_ms_per_image
4 train          2.4  -> end to end beside the model ceiling, eager, R18/MNv2/ViT-Ti: img/s, ratio, data-wait, CPU ms/img
4 compare        1.4  -> R18 end to end, dali:gpu vs torchvision:cpu (a worker per core) in one process: img/s each, ratio, PNG
5 train-compiled 5.5  -> train.compile=true end to end + compiled ceiling, R18 then ViT-Ti, MNv2; compile_s
5 tune           2.5  -> bench tune --quick --budget 90: best threads/pipelines/prefetch/decoder share, R18 GPU
5 demo           5.0  -> sslight demo (make demo's GPU branch): loss, img/s, kNN
5 profile        2.5  -> pipeline --profile-ops: per-op cost of the R18 GPU graph
5 pipeline-more  1.2  -> GPU pipeline alone: ViT-Ti; R18 --hw-decoder-load 1.0; R18 on 2 threads
5 torchvision    2.5  -> torchvision/PIL end to end, all cores: MNv2, ViT-Ti"
CALL_GROUPS="measure=env gpu-tests pipeline train compare
extra=train-compiled tune demo profile pipeline-more torchvision"

# call K: the device tool's command, carry and timeout_s
call_command() {
  local k=$1 what
  case $k in 1) what=prep ;; 2|3) what=stage ;; 4) what=measure ;; 5) what=extra ;; esac
  if [ "$k" -le $PARTS ]; then
    echo "bash .dali-p$((k - 1))/unpack.sh && export PYTHONPATH=/tmp/site:\$PWD; bash bench/gpu_session.sh $what"
  elif [ "$k" = 4 ]; then
    echo "export PYTHONPATH=/tmp/site:\$PWD; bash bench/gpu_session.sh $what"
  else
    echo "export PYTHONPATH=/tmp/site:\$PWD; BUDGET_S=<budget_left_s - 60> bash bench/gpu_session.sh $what"
  fi
}
call_carry() { if [ "$1" -le $PARTS ]; then echo "[\".dali-p$(($1 - 1))\"]"; else echo "[]"; fi; }
call_timeout() { case $1 in 1) echo 120 ;; 2) echo 60 ;; 3) echo 90 ;; 4) echo 480 ;; 5) echo "<BUDGET_S+20>" ;; esac; }

plan_call() {  # the call's header, then its steps with their minutes
  local k=$1
  echo "call $k  carry $(call_carry $k)  timeout_s $(call_timeout $k)"
  echo "  command: $(call_command $k)"
  echo "$PLAN" | awk -v k=$k '$1 == k {printf "  %-15s %4s min  ", $2, $3; $1 = $2 = $3 = ""; sub(/^ +/, ""); print}'
}

plan() {
  cat <<EOF
GPU session: 4 device calls back to back in one lease; call 5 only if time is left.
Here first: bash ../shared/gpu/stage-dali.sh   (DALI in $PARTS parts, .dali-p0 .. .dali-p$((PARTS - 1)), ~58 MiB each)
Each reply: if unpack.sh's 'DALI parts here: n of $PARTS' shows fewer parts than calls so far, the
machine is fresh: start over at call 1. Call the next one at once (the machine goes back 30 s after a
call); after call 4 (or 5), give_back.
EOF
  local k
  for k in 1 2 3 4; do plan_call $k; done
  echo "$PLAN" | awk '$1 <= 4 {s += $3} END {printf "total %.1f min (calls 1-4; the lease is 15)\n", s}'
  echo "Only if budget_left_s after call 4 is >= 200 (steps that no longer fit BUDGET_S are skipped, named):"
  plan_call 5
  echo "Cut to fit: train steps 15 per repeat (were 20), compare steps one per core (were 3), separate model-only ceilings (train's"
  echo "records hold the ceiling beside), and everything of call 5."
  echo "Results: \$OUT; commit them to bench/results/<tag>-<date>/ (tar -xzf the pack there)."
}

expand() {  # group names -> steps
  local s g
  for s in "$@"; do
    g=$(echo "$CALL_GROUPS" | sed -n "s/^$s=//p")
    if [ -n "$g" ]; then echo $g; else echo "$s"; fi
  done
}

names=$(echo "$PLAN" | awk '$2 !~ /^(start-up|transfer|idle)$/ {print $2}' | sort -u)
todo=$(expand "${ARGS[@]}")
for s in $todo; do
  if [ "$s" != plan ] && ! echo "$names" | grep -qx "$s"; then
    echo "gpu_session.sh: unknown step '$s' (steps: $(echo $names), groups: measure extra, plan)" >&2
    exit 2
  fi
done
[ "$(echo $todo)" = plan ] && { plan; exit 0; }
[ $DRY = 1 ] || mkdir -p "$NEW"
for s in $todo; do
  if [ "$s" = plan ]; then plan; continue; fi
  echo "=== $s ($(echo "$PLAN" | awk -v s="$s" '$2 == s {print $3; exit}') min expected) $(date -u +%H:%M:%S)"
  case $s in prep|stage|env|torchvision) ;; *) need_dali "$s" || continue ;; esac
  t0=$SECONDS; STEP=$s
  "step_${s//-/_}"
  echo "=== $s done in $((SECONDS - t0)) s"
done
[ ${#SKIPPED[@]} = 0 ] || printf 'skipped: %s\n' "${SKIPPED[@]}"

[ $DRY = 1 ] && exit 0
rm -f "$LAST"
n=$(find "$NEW" -type f | wc -l)
if [ "$n" -gt 7 ]; then
  pack="$DIR/$TAG-$(echo $todo | tr ' ' '_' | cut -c1-60).tar.gz"
  tar -czf "$pack" -C "$NEW" . && rm -rf "$NEW" && echo "packed $n files into $pack"
else
  mv "$NEW"/* "$DIR"/ 2>/dev/null; rmdir "$NEW" 2>/dev/null
  echo "wrote $n files to $DIR"
fi
ls -la "$DIR"
