#!/usr/bin/env bash
# GPU pilot of the study protocol (issue #20): every cell of the study-gpu grid (short-skip and same-layer,
# the seven fusion types of Table 4, b = 1..4: 56 cells) trained 2 epochs of 30 steps by `openaff study`
# itself, the second epoch timed; then the projected GPU-hours of the full grid (400 epochs, 3 and 5 seeds).
# Under 5 minutes on one H100/H200; nothing is installed, the sources run from src/ (PYTHONPATH=src).
#
#   OUT=/some/dir bash benchmarks/gpu_study_pilot.sh
#
# The data are synthetic CIFAR-100-format batches written on the spot (the device has no CIFAR-100): real
# steps on the real shapes (32x32x3, batch 128, 20 coarse labels), meaningless accuracies.
# Writes $OUT/gpu-study-pilot.json and .md (default OUT: benchmarks/results) and prints the table.
# BUDGET (seconds, default 240) caps the timing: depths not reached are extrapolated and marked so (the
# smallest depth of each scenario is always timed).
# DEVICE=cpu STEPS=2 VAL_STEPS=1 BATCH=8 WIDTH=0.125 SCENARIOS=short-skip FUSIONS=add,aff DEPTHS=1 smoke-tests
# the script without a GPU (tests/test_gpu_study_pilot.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
BUDGET=${BUDGET:-240}
ARGS=(--out "$OUT" --device "${DEVICE:-cuda}" --steps "${STEPS:-30}" --val-steps "${VAL_STEPS:-10}"
      --scenarios "${SCENARIOS:-short-skip,same-layer}" --fusions "${FUSIONS:-add,concat,ms_gau,ms_se,ms_sa,aff,iaff}"
      --depths "${DEPTHS:-1,2,3,4}" --budget "$BUDGET")
[ -n "${BATCH:-}" ] && ARGS+=(--batch "$BATCH")
[ -n "${WORK:-}" ] && ARGS+=(--work "$WORK")  # keep the data and the study folders (default: removed)
[ -n "${WIDTH:-}" ] && ARGS+=(--width-mult "$WIDTH")
if [ "${DEVICE:-cuda}" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$OUT/gpu-study-pilot-env.txt"
fi
# the hard limit only catches a hang: the budget stops the timing, the last cell and the projection follow it
timeout $(( BUDGET + 150 )) "$PY" benchmarks/gpu_study_pilot.py "${ARGS[@]}"
