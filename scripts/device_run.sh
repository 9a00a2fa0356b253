#!/usr/bin/env bash
# Everything one device call needs, in one go: build on the GPU machine, run the GPU tests (a hang is killed),
# compute-sanitizer on small problems, the backward fuzz, and the benchmark tables last. Logs go under $OUT.
# Usage (from the repo root): scripts/device_run.sh [build] [test] [sanitize] [sanitize_bwd] [sanitize_fp8] [fuzz] [bench]
#        [bench_bwd] [sass] [bwd_variants] [variant_tests] [reduce_check] [leftovers] [bwd_profile]
#        [bwd_stalls] [bwd_heads]
#   bwd_variants: BWD_VARIANTS="name=-DMACRO=1,-DOTHER=2 ..." (scripts/kernel_variants.py); a name starting with
#   two times the two-kernel arrangement (TILEWISE_BACKWARD_FUSED_DQ=0), the others the reduce kernel (the default;
#   "reduce=" with no flags builds the default source), names no_* or *_no_* are ablations (times only);
#   variant_tests: VARIANT=name
#   sanitize: forward and backward cases; sanitize_bwd: the backward cases alone (a device call of their own)
# PACKED=1: run what scripts/pack_for_device.sh built on the developer's machine (build-carry/pack/libs.tgz, named in
# the call's carry): no build here (55-100 s saved), BUILD=build-carry, the variants in build-carry/bv.
set -uo pipefail
OUT=${OUT:-/tmp/tilewise-out}
mkdir -p "$OUT"
CUTLASS=${CUTLASS:-$PWD/.venv/lib/python3.11/site-packages/cutlass_library/source/include}
[ -f "$CUTLASS/cute/tensor.hpp" ] && CUTLASS_FLAG=-DTILEWISE_CUTLASS_DIR="$CUTLASS" || CUTLASS_FLAG=  # optional
if [ -n "${PACKED:-}" ]; then
  BUILD=${BUILD:-build-carry}
  VARIANTS=$PWD/$BUILD/bv  # (bwd_variants, variant_tests: built with the pack)
else
  BUILD=${BUILD:-build-device}  # a second job at once (scripts/device_pair.sh) takes its own
  VARIANTS=/tmp/bwd-variants
fi
steps=${*:-test sanitize bench}

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
if [ -n "${PACKED:-}" ]; then
  tar xzf $BUILD/pack/libs.tgz || { echo "PACKED=1: no $BUILD/pack/libs.tgz (scripts/pack_for_device.sh, carry it)"; exit 1; }
  # the programs' RUNPATH is the packing machine's build folder
  export LD_LIBRARY_PATH=$PWD/$BUILD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  : > "$OUT/build.log"
else
  cmake -S . -B $BUILD $CUTLASS_FLAG -DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON > "$OUT/cmake.log" 2>&1 &&
    cmake --build $BUILD -j16 > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
grep -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c | head -5
# ptxas serialises every wgmma of a kernel when it cannot pipeline them (C7510-C7520): a silent 2x slowdown
grep -E "wgmma.mma_async instructions are serialized" "$OUT/build.log" | sed 's/^/WARNING: /' | sort -u | head -3

# compute-sanitizer, every tool on each small case of a parameterised suite: sanitize_cases SUITE CASE...
# SANITIZE_TOOLS picks the tools; SANITIZE_LIB runs them on another library (a bwd_variants one, e.g.
# SANITIZE_LIB=/tmp/bwd-variants/name, or $PWD/build-carry/bv/name with PACKED=1); SANITIZE_TIMEOUT the seconds per
# tool and case (300; racecheck on partial_tile_classes_d128_text_first needs more than 270); SANITIZE_PARALLEL=1 runs
# every tool and case as a process of its own at once (the GPU holds them all; racecheck's minutes per case then
# overlap: v3.13-v3.14 ran nine at once).
# The first hazard's lines are printed, since the logs can be long.
sanitize_one() {  # SUITE TOOL CASE
  local log="$OUT/sanitize_${2}_$3.log"
  LD_LIBRARY_PATH=${SANITIZE_LIB:-$PWD/$BUILD} timeout ${SANITIZE_TIMEOUT:-300} compute-sanitizer --tool $2 --error-exitcode 9 \
    $BUILD/tilewise_tests --gtest_filter="Cases/$1.*/$3*" > "$log" 2>&1
  local rc=$?
  { echo "$2 $3 rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
    grep -m1 -A2 -E "^========= (Error|Warning):" "$log" | cut -c1-200; }
}
sanitize_cases() {
  local suite=$1 tool case
  shift
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    for case in "$@"; do
      if [ -n "${SANITIZE_PARALLEL:-}" ]; then sanitize_one $suite $tool $case & else sanitize_one $suite $tool $case; fi
    done
  done
  wait
}
# scripts/backward_check.cpp against this build's library (the backward's variants, checks and profiles use it)
build_bwdcheck() {
  g++ -std=c++20 -O2 -Iinclude -I/usr/local/cuda/include scripts/backward_check.cpp -L$BUILD -ltilewise \
    -L/usr/local/cuda/lib64 -lcudart -Wl,--enable-new-dtags,-rpath,$PWD/$BUILD -o $BUILD/bwdcheck
}
# Small backward cases (tests/test_cuda_backward.cpp): partial tiles with text first at D 128 and with GQA at D 64
# (the _small cases: their larger siblings do not finish under racecheck in 240-330 s), per-head windows with GQA in
# bhsd (and with 6x8x8 tiles at D 128), masked attention-tile blocks, the D 96 reduce kernel on partial frames (its deferred dK wait), a block list
# leaving a key tile unseen, fused padded views. Overridable (BACKWARD_SANITIZE_CASES=...): racecheck takes up to 2
# minutes a case.
BACKWARD_SANITIZE_CASES=${BACKWARD_SANITIZE_CASES:-"sta_per_head_windows_gqa_bhsd_text_last
  partial_tile_classes_d128_text_first_small partial_tile_classes_gqa_d64_text_last_small
  attention_tile_tt2_masked_blocks_text attention_tile_partial_frames_d96 block_list_unseen_key_tile fused_padded_views
  tile_units_small_windows_gqa_bhsd_text_last"}

for step in $steps; do
  case $step in
    build) ;;  # the build above alone (e.g. before scripts/device_pair.sh's two jobs share it)
    test)
      echo "== GPU tests"
      # 420 s: the backward tests run the CPU reference (16 cores) on every small case, twice
      timeout 420 $BUILD/tilewise_tests --gtest_filter='Cuda*:*Cuda*' > "$OUT/gpu_tests.log" 2>&1
      echo "rc=$?"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|rel_l2|Expected|Which is|actual|seed" "$OUT/gpu_tests.log" | head -60
      ;;
    sanitize)
      # One run per tool and case, each with its own time limit: racecheck takes up to 2 minutes per case, so give
      # this step a device call of its own.
      echo "== compute-sanitizer (memcheck, racecheck, synccheck) on small problems"
      sanitize_cases CudaSmall sta_partial text_first partial_tile_classes_all partial_tile_classes_d128 \
        partial_tile_classes_f16_d96
      sanitize_cases CudaBackwardSmall $BACKWARD_SANITIZE_CASES
      ;;
    sanitize_bwd)
      echo "== compute-sanitizer (memcheck, racecheck, synccheck) on small backward problems"
      sanitize_cases CudaBackwardSmall $BACKWARD_SANITIZE_CASES
      ;;
    sanitize_fp8)
      # The FP8 forward (and its pre-pass) on partial tiles with long padded text, GQA, every head dim, and fp8_scaled
      echo "== compute-sanitizer (memcheck, racecheck, synccheck) on the FP8 forward"
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
        for t in PartialTilesLongTextGqaHeadDims ScaledWithQuantizeFp8IsFp8; do
          log="$OUT/sanitize_${tool}_fp8_$t.log"
          LD_LIBRARY_PATH=${SANITIZE_LIB:-$PWD/$BUILD} timeout ${SANITIZE_TIMEOUT:-300} compute-sanitizer --tool $tool \
            --error-exitcode 9 $BUILD/tilewise_tests --gtest_filter="CudaFp8Forward.$t" > "$log" 2>&1
          echo "$tool $t rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
          grep -m1 -A2 -E "^========= (Error|Warning):" "$log" | cut -c1-200
        done
      done
      ;;
    fuzz)
      # 1000 random problems, forward + backward on cuda against the CPU reference; a failure line each, then a table
      echo "== backward fuzz"
      timeout 420 $BUILD/tilewise_fuzz --problems ${FUZZ_PROBLEMS:-1000} --max-seconds ${FUZZ_SECONDS:-280} > "$OUT/fuzz.log" 2>&1
      echo "rc=$?"; grep -E "^FAIL|^stopping" "$OUT/fuzz.log" | head -20; sed -n '/^| tensor/,$p' "$OUT/fuzz.log"
      ;;
    bwd_variants)
      # Backward schedules and ablations (bwd_params.cuh) on row 1: each variant recompiles the backward's sources only.
      echo "== backward variants, row 1 (HunyuanVideo 30x48x80, w3x3x3)"
      build_bwdcheck || exit 1
      [ -n "${PACKED:-}" ] ||
        python3 scripts/kernel_variants.py $BUILD $VARIANTS ${BWD_VARIANTS:-} | tee "$OUT/variants_build.log"
      for v in base ${BWD_VARIANTS:-}; do
        name=${v%%=*}
        lib=$PWD/$BUILD; [ "$name" = base ] || lib=$VARIANTS/$name
        [ -f "$lib/libtilewise.so" ] || continue
        # two*: the two-kernel arrangement, the others the reduce kernel (chosen at plan time from the environment)
        case $name in two*) arrangement=0 ;; *) arrangement=2 ;; esac
        line=$(TILEWISE_BACKWARD_FUSED_DQ=$arrangement LD_LIBRARY_PATH=$lib timeout 60 $BUILD/bwdcheck bench1 2>&1 | tail -1)
        echo "$name: $line" | tee -a "$OUT/variants.log"
        case $name in no_*|*_no_*) continue ;; esac  # ablations: results are wrong, times only
        TILEWISE_BACKWARD_FUSED_DQ=$arrangement LD_LIBRARY_PATH=$lib timeout 60 $BUILD/bwdcheck 1 > "$OUT/check_$name.log" 2>&1
        echo "  check rc=$? $(tail -1 "$OUT/check_$name.log")"
        TILEWISE_BACKWARD_FUSED_DQ=$arrangement LD_LIBRARY_PATH=$lib timeout 90 ncu --clock-control none --kernel-name regex:'backward_kernel|bwd_preprocess' \
          --launch-count 3 --metrics gpu__time_duration.sum $BUILD/bwdcheck bench1 > "$OUT/ncu_$name.log" 2>&1
        echo "  ncu: $(grep -E 'gpu__time_duration.sum' "$OUT/ncu_$name.log" | awk '{print $(NF)}' | tr '\n' ' ') (preprocess, dQ, dK/dV; ms or us)"
      done
      ;;
    bwd_heads)
      # Row 1 and the whole grid under ncu at the base clock for several head counts (BWD_HEADS, "4 8 24"): active
      # SM-cycles (per streamed block: divide by 145,800 x heads for row 1, 1,620,000 x heads for the whole grid),
      # the L2 hit rate and the DRAM bytes of the reduce kernel: how row 1's extra cycles per block grow with the
      # heads in flight (docs/performance.md backward v3.18).
      echo "== backward cycles, L2 and DRAM by head count"
      build_bwdcheck || exit 1
      for h in ${BWD_HEADS:-4 8 24}; do
        for mode in bench1 bench_grid; do
          timeout 240 ncu --clock-control base --kernel-name regex:backward_kernel --launch-count 1 --csv \
            --metrics sm__cycles_active.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
            $BUILD/bwdcheck $mode $h > "$OUT/heads_${mode}_$h.csv" 2>&1
          echo "$mode heads $h: $(grep -E '^"' "$OUT/heads_${mode}_$h.csv" | awk -F'","' 'NR>1{printf "%s=%s ", $(NF-2), $NF}' | tr -d '"')"
        done
      done
      ;;
    variant_tests)
      # The backward GPU tests and the fuzz on one variant's library from bwd_variants (VARIANT=name): a schedule
      # that is to become the default passes them first.
      lib=$VARIANTS/${VARIANT:?set VARIANT to a bwd_variants name}
      echo "== backward GPU tests and fuzz on variant $VARIANT"
      # (without the file the loader falls back to the default library and the step would test that: v3.34's call 3)
      [ -f "$lib/libtilewise.so" ] || { echo "no $lib/libtilewise.so (not built, or not in the pack)"; continue; }
      LD_LIBRARY_PATH=$lib timeout 300 $BUILD/tilewise_tests --gtest_filter='*Cuda*Backward*:*Backward*Cuda*' \
        > "$OUT/tests_$VARIANT.log" 2>&1
      echo "tests rc=$? $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/tests_$VARIANT.log" | head -3 | tr '\n' ' ')"
      LD_LIBRARY_PATH=$lib timeout 240 $BUILD/tilewise_fuzz --problems ${FUZZ_PROBLEMS:-1000} \
        --max-seconds ${FUZZ_SECONDS:-150} > "$OUT/fuzz_$VARIANT.log" 2>&1
      echo "fuzz rc=$? $(grep -E '^problems' "$OUT/fuzz_$VARIANT.log")"
      ;;
    leftovers)
      # The reduce kernel's owned rows past a partial tile's box (docs/performance.md backward v3.9): the regression
      # test that fills shared memory with NaN patterns before each backward, five times.
      echo "== NaN-filled shared memory before the backward"
      LD_LIBRARY_PATH=$PWD/$BUILD timeout 200 $BUILD/tilewise_tests --gtest_filter='CudaBackwardLeftovers*' \
        --gtest_repeat=5 > "$OUT/leftovers.log" 2>&1
      echo "leftovers rc=$? passed $(grep -c '^\[       OK' "$OUT/leftovers.log") of 5"
      ;;
    reduce_check)
      # The reduce kernel (TILEWISE_BACKWARD_FUSED_DQ=2, docs/performance.md backward v3.6) on this build: against the
      # fp32 GPU reference on five shapes, row 1's time against the two kernels', then the backward GPU tests and the
      # fuzz with every non-deterministic backward through it.
      echo "== the reduce kernel"
      build_bwdcheck || exit 1  # always: a machine kept warm may hold an older one
      TILEWISE_BACKWARD_FUSED_DQ=2 timeout 120 $BUILD/bwdcheck 1 > "$OUT/check_reduce.log" 2>&1
      echo "check rc=$? $(tail -1 "$OUT/check_reduce.log")"
      # row 1 in both arrangements, alternated in one process (same clocks and power limit)
      timeout 120 stdbuf -oL $BUILD/bwdcheck arrangements 2>&1 | tail -7
      TILEWISE_BACKWARD_FUSED_DQ=2 timeout 300 $BUILD/tilewise_tests --gtest_filter='*Cuda*Backward*:*Backward*Cuda*' \
        > "$OUT/tests_reduce.log" 2>&1
      echo "tests rc=$? $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/tests_reduce.log" | head -3 | tr '\n' ' ')"
      TILEWISE_BACKWARD_FUSED_DQ=2 timeout 200 $BUILD/tilewise_fuzz --problems ${FUZZ_PROBLEMS:-1000} \
        --max-seconds ${FUZZ_SECONDS:-150} > "$OUT/fuzz_reduce.log" 2>&1
      echo "fuzz rc=$? $(grep -E '^problems' "$OUT/fuzz_reduce.log")"
      ;;
    bwd_profile)
      # Nsight Compute sections of row 1's dQ and dK/dV kernels (the second backward call: warm caches), as text
      echo "== backward profile, row 1"
      build_bwdcheck || exit 1  # always: a machine kept warm may hold an older one
      timeout 300 ncu --clock-control none --kernel-name regex:backward_kernel --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \
        $BUILD/bwdcheck bench1 > "$OUT/bwd_profile.txt" 2>&1
      echo "rc=$?"; grep -E "backward_kernel|Duration|Throughput|Issue Slots Busy|Stall|Warp Cycles Per Issued" \
        "$OUT/bwd_profile.txt" | head -40
      ;;
    bwd_stalls)
      # Source-level warp stall sampling of one backward kernel launch on row 1, in a -lineinfo build of its own
      # (build-prof): TILEWISE_BACKWARD_FUSED_DQ picks the arrangement (2: the reduce kernel), BWD_SKIP the launch
      # of `backward_kernel` (1: the second; in the two-kernel arrangement the dQ and dK/dV kernels alternate),
      # BWDCHECK_ARGS the problem (bench1: row 1; "bench_window 1 1 1 8": six blocks per item, where the item
      # boundary takes half the time, docs/performance.md backward v3.19).
      echo "== backward stall sampling, ${BWDCHECK_ARGS:-bench1} (TILEWISE_BACKWARD_FUSED_DQ=${TILEWISE_BACKWARD_FUSED_DQ:-0})"
      if [ ! -f build-prof/libtilewise.so ]; then
        cmake -S . -B build-prof -DTILEWISE_TESTS=OFF -DCMAKE_CUDA_FLAGS="-lineinfo" > "$OUT/cmake-prof.log" 2>&1 &&
          cmake --build build-prof -j16 --target tilewise_lib > "$OUT/build-prof.log" 2>&1 ||
          { tail -30 "$OUT/build-prof.log"; exit 1; }
      fi
      BUILD=build-prof build_bwdcheck || exit 1
      timeout 400 ncu --launch-skip ${BWD_SKIP:-1} --launch-count 1 -k regex:backward_kernel --set full \
        --import-source yes -f -o /tmp/bwd-prof build-prof/bwdcheck ${BWDCHECK_ARGS:-bench1} > "$OUT/ncu_stalls.log" 2>&1
      echo "ncu rc=$?"; tail -2 "$OUT/ncu_stalls.log"
      ncu -i /tmp/bwd-prof.ncu-rep --page details > "$OUT/bwd_details.txt" 2>&1
      ncu -i /tmp/bwd-prof.ncu-rep --page source --csv --print-source sass > "$OUT/bwd_source.csv" 2>/dev/null
      python3 scripts/stall_summary.py "$OUT/bwd_source.csv" | tee "$OUT/bwd_stalls.txt"
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
    bench_bwd)
      echo "== backward benchmark"
      PYTHONUNBUFFERED=1 timeout 540 python3 bench/bench_backward.py --lib $BUILD/libtilewise.so --also-arrangement 0 --out "$OUT/bench_bwd.md" \
        2>&1 | tee "$OUT/bench_bwd.log" | tail -40
      ;;
    *) echo "device_run.sh: unknown step '$step' (the steps are listed at the top of this script)" >&2; exit 2 ;;
  esac
done
