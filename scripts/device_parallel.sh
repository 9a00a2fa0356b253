#!/usr/bin/env bash
# Sequence parallelism on the GPU machine (issues 15 and 16), in one device call: diffusers from carried wheels
# (.whl), the library, the parallel tests (NCCL world size 1 included), then bench/bench_parallel.py under torchrun
# on every GPU of the machine. Logs and the table go under $OUT.
# Usage (repo root, on the GPU machine): scripts/device_parallel.sh [test] [bench] [train]
#   train: the STA recipe's h200 preset for a few steps on one GPU, then under torchrun with DDP, FSDP and sequence
#   parallelism on every GPU (issue 17's multi-GPU path on NCCL): summaries and step rates under $OUT/train-*
set -uo pipefail
OUT=${OUT:-/tmp/tilewise-out}
mkdir -p "$OUT"
# NVLink multicast stays off on the lent multi-GPU kinds (KINDS.md): also for every process started from here
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps=${*:-test bench}
GPUS=$(nvidia-smi -L | wc -l)
{ nvidia-smi -L; nvidia-smi topo -m; } > "$OUT/topology.txt" 2>&1
scripts/install_wheels.sh > "$OUT/wheels.log" 2>&1 || { tail -5 "$OUT/wheels.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/python PYTHONUNBUFFERED=1
if [ ! -f build-device/libtilewise.so ]; then
  cmake -S . -B build-device -DCMAKE_BUILD_TYPE=Release > "$OUT/cmake.log" 2>&1 &&
    cmake --build build-device -j"$(nproc)" --target tilewise_lib > "$OUT/build.log" 2>&1 ||
    { tail -30 "$OUT/build.log"; exit 1; }
fi
export TILEWISE_LIBRARY=$PWD/build-device/libtilewise.so
for step in $steps; do
  case $step in
    test)
      timeout ${TEST_SECONDS:-300} python3 -m pytest -q -rs tests/python/test_parallel.py tests/python/test_parallel_diffusers.py \
        tests/python/test_copy_engine.py \
        > "$OUT/pytest_parallel.log" 2>&1
      echo "pytest rc=$?"; grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest_parallel.log" | head -20
      ;;
    bench)
      timeout ${BENCH_SECONDS:-480} torchrun --nproc-per-node "$GPUS" bench/bench_parallel.py --profile ${BENCH_ARGS:-} --out "$OUT/parallel.md" \
        > "$OUT/parallel.log" 2>&1
      echo "bench_parallel on $GPUS GPUs rc=$?"; grep -vE "^(W|I)[0-9]{4}|^\*+$|Setting OMP" "$OUT/parallel.log" | tail -45
      ;;
    train)
      # TRAIN_STEPS optimizer steps, no dense pretraining, no proxy error: the point is that every mode trains on
      # NCCL and how fast a step is (tqdm's rate, the last line of each log)
      steps_n=${TRAIN_STEPS:-30}
      common="sta --preset h200 --steps $steps_n --pretrain-steps 0 --eval-samples 0 --save-every 1000"
      for mode in one ddp fsdp sequence; do
        case $mode in
          one) cmd="python3 -m tilewise.train $common --device cuda" ;;
          ddp) cmd="torchrun --nproc-per-node $GPUS -m tilewise.train $common --device cuda --parallel ddp" ;;
          fsdp) cmd="torchrun --nproc-per-node $GPUS -m tilewise.train $common --device cuda --parallel fsdp" ;;
          sequence) cmd="torchrun --nproc-per-node $GPUS -m tilewise.train $common --device cuda --sequence-parallel $GPUS" ;;
        esac
        start=$SECONDS
        timeout ${TRAIN_SECONDS:-150} $cmd --out /tmp/train-$mode > "$OUT/train_$mode.log" 2>&1
        rc=$?
        mkdir -p "$OUT/train-$mode"; cp /tmp/train-$mode/*.json "$OUT/train-$mode/" 2>/dev/null
        echo "train $mode rc=$rc $((SECONDS - start)) s: $(tr '\r' '\n' < "$OUT/train_$mode.log" | grep -E "step/s|s/step" | tail -1)"
      done
      ;;
  esac
done
