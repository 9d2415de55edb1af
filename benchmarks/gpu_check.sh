#!/usr/bin/env bash
# GPU check of issue #5 in one go (about 6-8 minutes on one H100/H200; nothing is installed).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Runs, from the repository root with PYTHONPATH=src:
#   tests              tests/test_fused_ops_gpu.py: fused ops, compiled blend kernels, recompute,
#                      folding and a compiled training step on CUDA                 -> $OUT/gpu_tests.txt
#   eager              training, eager, bf16, channels_last, batch 256: our models (with and without
#                      recompute) vs resnet50d, resnext50d_32x4d, seresnet50, skresnet50, resnet50
#   compiled           the same with torch.compile: aff_resnet50 vs resnet50d
#   compiled-resnext   iaff_resnext50_32x4d vs resnext50d_32x4d, compiled
#   kernels            eager training with the compiled blend kernels (--fusion-kernels compiled)
#   infer              inference, eager, with and without BatchNorm folding
#   compiled-recompute aff_resnet50+recompute vs resnet50d, compiled
# then $OUT/summary.md: every target of the issue, met or not (benchmarks/summarize.py).
# Each bench is one process with its own time limit; a failing step does not stop the others.
# BUDGET (seconds, default 540) caps the whole script so that it ends, summary included, inside one
# 600-second device call: a step starts only with at least 30 s left and is cut at what is left.
# STEPS="eager compiled" runs a subset (e.g. the steps a first call did not reach). Copy the JSON
# and markdown files to benchmarks/results/ and the summary into benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
BATCH=${BATCH:-256}
# DEVICE=cpu BATCH=2 IMG=64 STEPS="eager infer" smoke-tests the script without a GPU.
COMMON=(--device "${DEVICE:-cuda}" --batch "$BATCH" --img-size "${IMG:-224}" --amp bf16 --channels-last
        --warmup 3 --repeats 5 --iters 5)
BUDGET=${BUDGET:-540}
T0=$SECONDS
left() { echo $(( BUDGET - (SECONDS - T0) )); }
cap() {  # cap LIMIT: the step's limit, cut to the time left (minus 10 s for the summary)
  local l; l=$(( $(left) - 10 )); (( $1 < l )) && l=$1; echo "$l"
}
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

log "start; python: $PY"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv;
  "$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)";
  "$PY" -c "import triton; print('triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

STEPS=${STEPS:-"tests eager compiled compiled-resnext kernels infer compiled-recompute"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
bench() {  # bench NAME TIMEOUT ARGS...: one process, JSON + markdown under $OUT
  local name=$1 limit; limit=$(cap "$2"); shift 2
  if (( limit < 30 )); then log "$name skipped: $(left) s of the budget left"; return; fi
  log "$name (limit ${limit}s)"
  # --time-limit: past it the bench starts no more rounds and writes what it has, so that a slow
  # step still reports numbers; the hard timeout only catches a step stuck in compilation.
  timeout "$limit" "$PY" -m openaff.bench "${COMMON[@]}" "$@" --time-limit $(( limit - 45 > 15 ? limit - 45 : 15 )) \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  log "$name rc=$?"
}

if want tests; then
  log "GPU tests"
  timeout "$(cap 120)" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_ops_gpu.py > "$OUT/gpu_tests.txt" 2>&1
  log "GPU tests rc=$? ($(tail -1 "$OUT/gpu_tests.txt"))"
fi
# Targets first; each compiled run is its own process so that a time-out loses only that run
# (the second process that compiles resnet50d mostly hits the inductor cache of the first).
want eager && bench gpu-train-eager 180 --mode train --compile off \
  --models aff_resnet50,aff_resnet50+recompute,iaff_resnext50_32x4d,iaff_resnext50_32x4d+recompute,resnet50d,resnext50d_32x4d,seresnet50,skresnet50,resnet50 \
  --baseline resnet50d --pair iaff_resnext50_32x4d=resnext50d_32x4d
want compiled && bench gpu-train-compiled 200 --mode train --compile on --models aff_resnet50,resnet50d \
  --baseline resnet50d
want compiled-resnext && bench gpu-train-compiled-resnext 200 --mode train --compile on \
  --models iaff_resnext50_32x4d,resnext50d_32x4d --baseline resnext50d_32x4d
want kernels && bench gpu-train-eager-kernels 90 --mode train --compile off --fusion-kernels compiled \
  --models aff_resnet50,aff_resnet50+recompute,resnet50d --baseline resnet50d
want infer && bench gpu-infer-eager 60 --mode infer --compile off \
  --models aff_resnet50,aff_resnet50+fold,iaff_resnext50_32x4d+fold,resnet50d,resnet50d+fold,resnext50d_32x4d+fold \
  --baseline resnet50d --pair iaff_resnext50_32x4d=resnext50d_32x4d+fold
want compiled-recompute && bench gpu-train-compiled-recompute 150 --mode train --compile on \
  --models aff_resnet50+recompute,resnet50d --baseline resnet50d

shopt -s nullglob
jsons=("$OUT"/gpu-*.json)
if [ ${#jsons[@]} -gt 0 ]; then
  "$PY" benchmarks/summarize.py "${jsons[@]}" > "$OUT/summary.md" 2>&1
  cat "$OUT"/gpu-*.md "$OUT/summary.md"
fi
log "done"
