#!/usr/bin/env bash
# Two single-GPU jobs at once on a machine with two GPUs (the nvidia-h200-x2 kind): the first command on GPU 0,
# the second on GPU 1, each with its own output folder and wheel folder, so one device call does the work of two
# (each GPU has its own power limit; the jobs share only the host). Prints the second job's output, then the first's,
# once both have ended.
# Only 8 files come back from a device call's $OUT: each job writes under $PAIR_WORK/gpuN (its $OUT), and at the end
# $OUT receives the two consoles (gpu0_console.txt, gpu1_console.txt) and everything else in pair.tgz.
# PAIR_TIMEOUT (seconds) ends both jobs by then, so that the call's own copying is left time before run's limit.
# Two jobs that build: build first (`scripts/device_run.sh build`), give one BUILD=build-device2, or carry
# build-device/libtilewise.so so that scripts/device_python.sh builds nothing.
# Usage (repo root, on the GPU machine):
#   scripts/device_run.sh build && PAIR_TIMEOUT=500 scripts/device_pair.sh \
#     "TRAIN_ARGS='--steps 150' scripts/device_python.sh train_evdit" \
#     "VARIANT=syncwarp scripts/device_run.sh bwd_variants variant_tests"
set -uo pipefail
OUT=${OUT:-/tmp/tilewise-out}
[ $# -eq 2 ] || { echo "usage: scripts/device_pair.sh 'COMMAND FOR GPU 0' 'COMMAND FOR GPU 1'" >&2; exit 2; }
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] || { echo "device_pair.sh: this machine has fewer than 2 GPUs" >&2; exit 2; }
WORK=${PAIR_WORK:-/tmp/pair-out}
rm -rf "$WORK"; mkdir -p "$WORK/gpu0" "$WORK/gpu1" "$OUT"
# Each job in a session of its own (setsid), killed as a whole once it ends: a step cut short by `timeout` signals
# only its script, and a program the script started (compute-sanitizer, say) would keep its GPU busy into the
# next step of the device call (it once slowed a following 2-GPU benchmark 2x).
pids=()
for gpu in 0 1; do
  cmd=$1; [ $gpu = 1 ] && cmd=$2
  CUDA_VISIBLE_DEVICES=$gpu OUT=$WORK/gpu$gpu TILEWISE_SITE=/tmp/site$gpu \
    setsid ${PAIR_TIMEOUT:+timeout -k 5 $PAIR_TIMEOUT} bash -c "{ $cmd
} > '$WORK/gpu$gpu/console.txt' 2>&1; echo \"gpu$gpu rc=\$?\" >> '$WORK/gpu$gpu/console.txt'" &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid"
  kill -KILL -- "-$pid" 2>/dev/null && echo "device_pair.sh: killed what job $pid left running"
done
for gpu in 0 1; do
  grep -q "^gpu$gpu rc=" "$WORK/gpu$gpu/console.txt" || echo "gpu$gpu: stopped at PAIR_TIMEOUT" >> "$WORK/gpu$gpu/console.txt"
  cp "$WORK/gpu$gpu/console.txt" "$OUT/gpu${gpu}_console.txt"
done
tar czf "$OUT/pair.tgz" -C "$WORK" .
cat "$WORK/gpu1/console.txt" "$WORK/gpu0/console.txt"
