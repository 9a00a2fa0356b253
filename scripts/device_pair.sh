#!/usr/bin/env bash
# Two single-GPU jobs at once on a machine with two GPUs (the nvidia-h200-x2 kind): the first command on GPU 0,
# the second on GPU 1, each with its own $OUT/gpuN folder and wheel folder, so one device call does the work of two
# (each GPU has its own power limit; the jobs share only the host). Prints the second job's output, then the first's.
# Two jobs that build: give one BUILD=build-device2 (scripts/device_run.sh), or carry build-device/libtilewise.so so
# that scripts/device_python.sh builds nothing.
# Usage (repo root, on the GPU machine):
#   scripts/device_pair.sh "TRAIN_ARGS='--steps 150' scripts/device_python.sh train_evdit" \
#                          "VARIANT=syncwarp scripts/device_run.sh bwd_variants variant_tests"
set -uo pipefail
OUT=${OUT:-/tmp/tilewise-out}
[ $# -eq 2 ] || { echo "usage: scripts/device_pair.sh 'COMMAND FOR GPU 0' 'COMMAND FOR GPU 1'" >&2; exit 2; }
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] || { echo "device_pair.sh: this machine has fewer than 2 GPUs" >&2; exit 2; }
mkdir -p "$OUT/gpu0" "$OUT/gpu1"
( CUDA_VISIBLE_DEVICES=0 OUT=$OUT/gpu0 TILEWISE_SITE=/tmp/site0 bash -c "$1" > "$OUT/gpu0/console.txt" 2>&1
  echo "gpu0 rc=$?" >> "$OUT/gpu0/console.txt" ) &
CUDA_VISIBLE_DEVICES=1 OUT=$OUT/gpu1 TILEWISE_SITE=/tmp/site1 bash -c "$2" 2>&1 | tee "$OUT/gpu1/console.txt"
echo "gpu1 rc=${PIPESTATUS[0]}"
wait
cat "$OUT/gpu0/console.txt"
