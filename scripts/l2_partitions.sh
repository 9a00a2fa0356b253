#!/usr/bin/env bash
# Which SMs share an L2 partition (docs/performance.md backward v3.27): plain loads from all SMs keep ~28 MB of the
# H200's 60 MB, as if each line read were held twice. If one partition's SMs alone keep 40-48 MB, the duplication is
# real and that set of SM ids is the partition. For each bit K of the SM id, the SMs with bit K = 0 sweep W MiB
# (scripts/l2_probe.cu, ten rounds), and ncu's DRAM bytes give what missed; the first line is all SMs, the second
# the SMs below 66. Runs on the device (nvcc, ncu); ~1 minute.
# Measured (v3.28): no half keeps more than all SMs (40 MiB: 126-157 MB read against 129; 48 MiB: 435-478 against
# 475), so no bit of the SM id, nor the lower half, is a partition that would hold its own copy of the lines.
# Usage: scripts/l2_partitions.sh [SIZES_MIB, default 40,48]
set -uo pipefail
sizes=${1:-40,48}
probe=${TMPDIR:-/tmp}/l2_probe
nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o "$probe" scripts/l2_probe.cu || exit 1
run() {  # LABEL ARGS...: one line per size, the DRAM MB read over the ten rounds
  local label=$1
  shift
  ncu --metrics dram__bytes_read.sum -k regex:sweep "$probe" --modes read --rounds 10 --sizes "$sizes" "$@" 2>&1 |
    awk -v label="$label" '/dram__bytes_read.sum/ { v = $NF; u = $(NF - 1); if (u == "Gbyte") v *= 1000;
                                                    if (u == "Kbyte") v /= 1000; if (u == "byte") v /= 1e6;
                                                    printf "%s %.1f MB; ", label, v }
                           END { print "" }'
}
echo "sizes $sizes MiB, DRAM read over ten rounds (the first round's W is cold; the rest is what the L2 did not keep):"
run "all SMs:"
run "SMs < 66:" --sms 66
for k in 0 1 2 3 4 5 6; do run "bit $k = 0:" --sm-bit "$k:0"; done
