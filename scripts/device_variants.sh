#!/usr/bin/env bash
# Builds kernel variants side by side (compile-time switches) and benchmarks them in one device call.
# Usage: [ROWS=1,2] [ONLY=w3x3x3] [NO_DENSE=1] scripts/device_variants.sh "NAME:FLAGS" ...
# (FLAGS are CUDA defines, e.g. -DTILEWISE_HOPPER_OVERLAP=1; "NAME@DIR:FLAGS" builds the source tree in DIR, e.g. an
# earlier revision: git archive REV | tar -x -C build-src-REV, carried to the device)
set -uo pipefail
OUT=${OUT:-/tmp/tilewise-out}
CUTLASS=${CUTLASS:-$PWD/.venv/lib/python3.11/site-packages/cutlass_library/source/include}
[ -f "$CUTLASS/cute/tensor.hpp" ] && CUTLASS_FLAG=-DTILEWISE_CUTLASS_DIR="$CUTLASS" || CUTLASS_FLAG=  # optional
ROWS=${ROWS:-1,2}
EXTRA=()  # ONLY=w3x3x3,partial runs only those rows; NO_DENSE=1 skips the SDPA baselines
[ -n "${ONLY:-}" ] && EXTRA+=(--only "$ONLY")
[ -n "${NO_DENSE:-}" ] && EXTRA+=(--no-dense)
for spec in "$@"; do
  name=${spec%%:*}; flags=${spec#*:}; src=.
  [[ $name == *@* ]] && { src=${name#*@}; name=${name%%@*}; }
  cmake -S "$src" -B build-$name $CUTLASS_FLAG -DTILEWISE_TESTS=OFF -DCMAKE_CUDA_FLAGS="$flags" \
    > "$OUT/cmake-$name.log" 2>&1 && cmake --build build-$name -j16 --target tilewise_lib > "$OUT/build-$name.log" 2>&1 \
    || { echo "build $name failed"; tail -20 "$OUT/build-$name.log"; continue; }
  echo "== $name ($flags): $(grep -E 'bytes stack' "$OUT/build-$name.log" | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
  grep -qE "wgmma.mma_async instructions are serialized" "$OUT/build-$name.log" && echo "WARNING: $name: ptxas serialised wgmma"
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/bench_forward.py --lib build-$name/libtilewise.so --rows "$ROWS" "${EXTRA[@]}" \
    --no-flex --out "$OUT/bench-$name.md" > "$OUT/bench-$name.log" 2>&1
  cut -d'|' -f2-5 "$OUT/bench-$name.md" | head -12
done
