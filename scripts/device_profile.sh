#!/usr/bin/env bash
# ncu profile of one forward launch (HunyuanVideo row 1, 4 heads by default) with SASS-level stall sampling.
# Usage (repo root, on the GPU machine): scripts/device_profile.sh [BUILD_DIR] [extra profile_forward.py args]
# Writes $OUT/${TAG}details.txt (all sections) and $OUT/${TAG}source.csv (per-instruction counters); TAG defaults to
# the build directory name.
set -uo pipefail
OUT=${OUT:-/tmp/tilewise-out}
BUILD=${1:-build-prof}; shift || true
TAG=${TAG:-$BUILD-}
mkdir -p "$OUT"
if [ ! -f "$BUILD/libtilewise.so" ]; then
  cmake -S . -B "$BUILD" -DTILEWISE_TESTS=OFF -DCMAKE_CUDA_FLAGS="-lineinfo" > /tmp/cmake-prof.log 2>&1 &&
    cmake --build "$BUILD" -j16 --target tilewise_lib > /tmp/build-prof.log 2>&1 || { tail -30 /tmp/build-prof.log; exit 1; }
fi
timeout 400 ncu --launch-skip 1 --launch-count 1 -k regex:forward_kernel --set full --import-source yes \
  -f -o /tmp/prof python3 scripts/profile_forward.py "$BUILD/libtilewise.so" "$@" > /tmp/ncu.log 2>&1
echo "ncu rc=$?"; tail -2 /tmp/ncu.log
ncu -i /tmp/prof.ncu-rep --page details > "$OUT/${TAG}details.txt" 2>&1
ncu -i /tmp/prof.ncu-rep --page source --csv --print-source sass > "$OUT/${TAG}source.csv" 2>/dev/null
grep -E "Duration|Shared|Pipe|pipe|Compute \(SM\) Throughput|Issue Slots Busy|Tensor|Warp Cycles Per Issued|No Eligible|Active Warps Per|L2 Cache Throughput|Registers Per" "$OUT/${TAG}details.txt" | head -40
