#!/usr/bin/env bash
# The Python side on the GPU machine in one go: diffusers from local wheels (carry .whl), the library build, the
# torch/diffusers/calibration tests (CUDA parts included) and the end-to-end transformer benchmark.
# Usage (repo root, on the GPU machine): scripts/device_python.sh [test] [e2e] [calib] [train_sta] [train_evdit]
#        [train_step] [packaging_segv]   (the training recipes' h200 preset with its proxy error, the training-step
#        benchmark, the native frames of the packaging test's crash)
set -uo pipefail
OUT=${OUT:-/tmp/tilewise-out}
mkdir -p "$OUT"
steps=${*:-test e2e}
scripts/install_wheels.sh > "$OUT/wheels.log" 2>&1 || { tail -5 "$OUT/wheels.log"; exit 1; }
# TILEWISE_SITE: where the wheels go (two of these scripts at once, one per GPU, each need their own)
export PYTHONPATH=${TILEWISE_SITE:-/tmp/site}:$PWD/python
if [ ! -f build-device/libtilewise.so ]; then
  cmake -S . -B build-device -DCMAKE_BUILD_TYPE=Release > /tmp/cmake.log 2>&1 &&
    cmake --build build-device -j16 --target tilewise_lib > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
fi
export TILEWISE_LIBRARY=$PWD/build-device/libtilewise.so PYTHONUNBUFFERED=1
for step in $steps; do
  case $step in
    test)
      # SIGINT at the limit: pytest then still prints its summary (which tests failed), as it does not when killed.
      # The whole suite took over 400 s on the H200 (2026-11-29).
      timeout -s INT ${PYTEST_SECONDS:-540} python3 -m pytest -q -rfEs --durations=6 tests/python > "$OUT/pytest_gpu.log" 2>&1
      echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.log" | head -30
      ;;
    e2e)
      timeout 420 python3 bench/bench_e2e.py --out "$OUT/e2e.md" > "$OUT/e2e.log" 2>&1
      echo "e2e rc=$?"; tail -12 "$OUT/e2e.log"
      ;;
    train_sta|train_evdit)
      # One recipe alone per device call (evdit at 200 steps per stage takes about 8 minutes; both at once did not
      # fit one call). TRAIN_ARGS overrides the preset, e.g. "--steps 200 --pretrain-steps 200". Checkpoints stay
      # on the machine; the summary, eval.json and search/strategy files come back.
      recipe=${step#train_}
      timeout ${TRAIN_SECONDS:-540} python3 -m tilewise.train "$recipe" --preset h200 --device cuda \
        --out "/tmp/train-$recipe" ${TRAIN_ARGS:-} > "$OUT/train_$recipe.log" 2>&1
      echo "$step rc=$?"; mkdir -p "$OUT/train-$recipe"; cp /tmp/train-$recipe/*.json "$OUT/train-$recipe/" 2>/dev/null
      tr '\r' '\n' < "$OUT/train_$recipe.log" | grep -E "tilewise train|100%\|" | tail -15
      ;;
    train_step)
      timeout ${STEP_SECONDS:-420} python3 bench/bench_train_step.py --lib build-device/libtilewise.so --out "$OUT/train_step.md" \
        > "$OUT/train_step.log" 2>&1
      echo "train_step rc=$?"; tail -12 "$OUT/train_step.log"
      ;;
    packaging_segv)
      # The installed CPU-only wheel's SIGSEGV in tw_device_supports_precision, seen on the H200 only: its native
      # frames (scripts/segv_backtrace.c, preloaded; the test's subprocesses inherit LD_PRELOAD), the toolchain
      # that built the wheel and what its library links.
      cc -shared -fPIC -O1 -o /tmp/segv_backtrace.so scripts/segv_backtrace.c || exit 1
      LD_PRELOAD=/tmp/segv_backtrace.so timeout 240 python3 -m pytest -x -q -p no:cacheprovider --basetemp=/tmp/pk \
        tests/python/test_packaging.py -k installed_wheel > "$OUT/packaging_segv.log" 2>&1
      echo "packaging rc=$?"; grep -E "passed|failed" "$OUT/packaging_segv.log" | tail -1
      grep -oE "segv_backtrace:[^']*" "$OUT/packaging_segv.log" | head -1 | sed 's/\\n/\n/g' | head -25
      echo "CXX=${CXX:-} $(${CXX:-c++} --version | head -1)"
      readelf -d /tmp/pk/*/site/tilewise/libtilewise.so 2>/dev/null | grep -E "NEEDED"
      ;;
    calib)
      timeout 300 python3 bench/bench_calibrate.py --out "$OUT/calib.md" > "$OUT/calib.log" 2>&1
      echo "calib rc=$?"; tail -15 "$OUT/calib.log"
      ;;
  esac
done
