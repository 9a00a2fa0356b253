#!/usr/bin/env bash
# Sequence parallelism on the GPU machine (issues 15 and 16), in one device call: diffusers from carried wheels
# (.whl), the library, the parallel tests (NCCL world size 1 included), then bench/bench_parallel.py under torchrun
# on every GPU of the machine. Logs and the table go under $OUT.
# Usage (repo root, on the GPU machine): scripts/device_parallel.sh [test] [bench]
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
      timeout 300 python3 -m pytest -q -rs tests/python/test_parallel.py tests/python/test_parallel_diffusers.py \
        > "$OUT/pytest_parallel.log" 2>&1
      echo "pytest rc=$?"; grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest_parallel.log" | head -20
      ;;
    bench)
      timeout 480 torchrun --nproc-per-node "$GPUS" bench/bench_parallel.py --profile --out "$OUT/parallel.md" \
        > "$OUT/parallel.log" 2>&1
      echo "bench_parallel on $GPUS GPUs rc=$?"; grep -vE "^(W|I)[0-9]{4}|^\*+$|Setting OMP" "$OUT/parallel.log" | tail -45
      ;;
  esac
done
