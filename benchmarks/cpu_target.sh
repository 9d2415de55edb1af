#!/usr/bin/env bash
# CPU targets of issues #5 and #15, like for like (fp32, 2 threads, batch 8, 224x224): AFF-ResNet-50
# <= 1.06x the time of resnet50d, unfolded against unfolded and folded against folded; iAFF-ResNeXt-50
# within its FLOPs ratio (1.36) of resnext50d_32x4d; the add-twin `aff_resnet50:add` (resnet50d built
# from our blocks, identical outputs) beside resnet50d, which shows our code's own overhead. Measured in
# RUNS separate processes of ROUNDS paired rounds each, for each memory format in FORMATS (the same for
# the model and its baseline), and with COMPILED=1 one process per format of the compiled pair.
#
#   bash benchmarks/cpu_target.sh            # RUNS=4 ROUNDS=12 FORMATS="nchw cl" COMPILED=1: ~40 minutes on the 2-core VM
#   ALLOC=system OUT=/tmp/system bash benchmarks/cpu_target.sh   # the same with the system's malloc
#
# On a shared VM one process can be a few per cent slower for one model than another process is
# (where its memory lands), for all its rounds; rounds within a process cannot average that out, so
# the verdict (results/cpu-target-summary.md, benchmarks/summarize.py) takes the median of the runs.
# `openaff bench` keeps freed memory in the process (--cpu-alloc retain, the default): with the
# system's malloc most of a forward pass's pages fault afresh every step, which costs every model
# 15-25 % and, because how many fault depends on the order of allocations, decides the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-4}
ROUNDS=${ROUNDS:-12}
FORMATS=${FORMATS:-nchw cl}
ALLOC=${ALLOC:-retain}   # or system: malloc as the system sets it (page faults every step)
COMPILED=${COMPILED:-1}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
BIN=${OPENAFF:-openaff}
[ -x .venv/bin/openaff ] && [ -z "${OPENAFF:-}" ] && BIN=.venv/bin/openaff
rm -f "$OUT"/cpu-target-*run*.json "$OUT"/cpu-target-*run*.md
for i in $(seq 1 "$RUNS"); do
  for fmt in $FORMATS; do
    flag=--no-channels-last; [ "$fmt" = cl ] && flag=--channels-last
    "$BIN" bench --device cpu --mode infer --batch 8 --threads 2 --repeats "$ROUNDS" --iters 1 $flag --cpu-alloc "$ALLOC" \
      --models aff_resnet50+fold,aff_resnet50,aff_resnet50:add,aff_resnet50:add+fold,resnet50d+fold,iaff_resnext50_32x4d,iaff_resnext50_32x4d+fold,resnext50d_32x4d \
      --baseline resnet50d --pair iaff_resnext50_32x4d=resnext50d_32x4d \
      --json "$OUT/cpu-target-$fmt-run$i.json" > /dev/null
    echo "run $i ($fmt) of $RUNS done"
  done
done
if [ "$COMPILED" = 1 ]; then
  for fmt in $FORMATS; do
    flag=--no-channels-last; [ "$fmt" = cl ] && flag=--channels-last
    "$BIN" bench --device cpu --mode infer --batch 8 --threads 2 --repeats "$ROUNDS" --iters 1 $flag --cpu-alloc "$ALLOC" \
      --compile on --models aff_resnet50 --baseline resnet50d --json "$OUT/cpu-target-$fmt-compiled-run1.json" > /dev/null
    echo "compiled ($fmt) done"
  done
fi
python3 benchmarks/summarize.py "$OUT"/cpu-target-*run*.json | grep -E "^\|( target|---)|CPU" > "$OUT/cpu-target-summary.md"
cat "$OUT/cpu-target-summary.md"
