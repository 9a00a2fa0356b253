#!/usr/bin/env bash
# Everything one device call needs, in one go: build on the GPU machine, run the GPU tests (a hang is killed),
# compute-sanitizer on small problems, and the benchmark table last. Logs go under $OUT.
# Usage (from the repo root): scripts/device_run.sh [test] [sanitize] [bench] [sass]
set -uo pipefail
OUT=${OUT:-/tmp/tilewise-out}
mkdir -p "$OUT"
CUTLASS=${CUTLASS:-$PWD/.venv/lib/python3.11/site-packages/cutlass_library/source/include}
[ -f "$CUTLASS/cute/tensor.hpp" ] && CUTLASS_FLAG=-DTILEWISE_CUTLASS_DIR="$CUTLASS" || CUTLASS_FLAG=  # optional
BUILD=build-device
steps=${*:-test sanitize bench}

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
cmake -S . -B $BUILD $CUTLASS_FLAG -DCMAKE_BUILD_TYPE=Release > "$OUT/cmake.log" 2>&1 &&
  cmake --build $BUILD -j16 > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
grep -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c | head -5
# ptxas serialises every wgmma of a kernel when it cannot pipeline them (C7510-C7520): a silent 2x slowdown
grep -E "wgmma.mma_async instructions are serialized" "$OUT/build.log" | sed 's/^/WARNING: /' | sort -u | head -3

for step in $steps; do
  case $step in
    test)
      echo "== GPU tests"
      timeout 300 $BUILD/tilewise_tests --gtest_filter='Cuda*:*Cuda*' > "$OUT/gpu_tests.log" 2>&1
      echo "rc=$?"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|rel_l2|Expected|Which is|actual|seed" "$OUT/gpu_tests.log" | head -60
      ;;
    sanitize)
      # One run per tool and case, each with its own time limit: racecheck takes up to 2 minutes per case, so give
      # this step a device call of its own.
      echo "== compute-sanitizer (memcheck, racecheck, synccheck) on small problems"
      for tool in memcheck racecheck synccheck; do
        for case in sta_partial text_first partial_tile_classes_all partial_tile_classes_d128 partial_tile_classes_f16_d96; do
          timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 \
            $BUILD/tilewise_tests --gtest_filter="Cases/CudaSmall.*/$case*" > "$OUT/sanitize_${tool}_$case.log" 2>&1
          echo "$tool $case rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_${tool}_$case.log" | tail -1)"
        done
      done
      ;;
    sass)
      cuobjdump -sass $BUILD/libtilewise.so > "$OUT/sass.txt" 2>/dev/null
      echo "HGMMA: $(grep -c HGMMA "$OUT/sass.txt")  local ld/st: $(grep -cE 'LDL|STL' "$OUT/sass.txt")"
      ;;
    bench)
      echo "== benchmark"
      PYTHONUNBUFFERED=1 timeout 480 python3 bench/bench_forward.py --lib $BUILD/libtilewise.so --out "$OUT/bench.md" \
        2>&1 | tee "$OUT/bench.log" | tail -40
      ;;
  esac
done
