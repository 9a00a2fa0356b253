#!/usr/bin/env bash
# Builds here what a device call runs and packs it for the call's `carry`, so that the device spends no time building
# (55-100 s of each call's 30-minute session budget; docs/performance.md backward v3.28, whose calls 5-8 ran this
# way): the library, the test and fuzz programs, and the backward variants of BWD_VARIANTS (scripts/kernel_variants.py,
# into build-carry/bv/NAME), in build-carry/pack/libs.tgz (compressed: the carry limit is 64 MiB with the tree).
# Then: run(command="PACKED=1 scripts/device_run.sh STEPS", carry=["build-carry/pack"]).
# Usage: [BWD_VARIANTS="name=-DMACRO=1,-DOTHER=2 ..."] scripts/pack_for_device.sh
set -euo pipefail
BUILD=build-carry
CUTLASS=${CUTLASS:-$PWD/.venv/lib/python3.11/site-packages/cutlass_library/source/include}
[ -f "$CUTLASS/cute/tensor.hpp" ] && CUTLASS_FLAG=-DTILEWISE_CUTLASS_DIR="$CUTLASS" || CUTLASS_FLAG=  # as device_run.sh
cmake -S . -B $BUILD $CUTLASS_FLAG -DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON > /dev/null
cmake --build $BUILD -j"$(nproc)" --target tilewise_lib tilewise_tests tilewise_fuzz > $BUILD/pack_build.log 2>&1 ||
  { tail -40 $BUILD/pack_build.log; exit 1; }
rm -rf $BUILD/bv $BUILD/pack
if [ -n "${BWD_VARIANTS:-}" ]; then
  # (word splitting intended: one NAME=FLAGS argument per variant)
  # shellcheck disable=SC2086
  python3 scripts/kernel_variants.py $BUILD $BUILD/bv $BWD_VARIANTS | cut -c1-200
  rm -f $BUILD/bv/*/*.o  # (the objects are not needed there)
fi
mkdir -p $BUILD/pack
tar czf $BUILD/pack/libs.tgz $BUILD/libtilewise.so $BUILD/tilewise_tests $BUILD/tilewise_fuzz \
  $([ -d $BUILD/bv ] && echo $BUILD/bv)
size=$(stat -c %s $BUILD/pack/libs.tgz)
echo "packed $BUILD/pack/libs.tgz: $((size >> 20)) MiB; carry [\"$BUILD/pack\"], run PACKED=1 scripts/device_run.sh ..."
[ "$size" -lt $((48 << 20)) ] || echo "WARNING: over 48 MiB: with the tree it may pass the 64 MiB carry limit"
