#!/usr/bin/env python3
"""The FP8 forward's consumer timeline: where each warpgroup of one CTA spends its cycles, block by block.

Needs a library built with -DTILEWISE_HOPPER_FP8_TRACE=1 (scripts/kernel_variants.py --source
hopper/fp8/fp8_forward.cu BUILD OUT trace=-DTILEWISE_HOPPER_FP8_TRACE=1): CTA 0's consumer warpgroups stamp the SM
clock at each step of their first 1024 key blocks (fp8_consumer.cuh). Runs the FP8 kernel ("fp8_scaled") on one
benchmark row, reads the stamps back and prints, per warpgroup, the median cycles of each step, then how often the
tensor cores may be busy (some warpgroup between a GEMM's issue and the end of its wait) while a warpgroup runs its
softmax, and a stretch of the merged timeline.

Usage: python3 scripts/fp8_trace.py --lib /tmp/f8/trace/libtilewise.so [--row "30x48x80 w3x3x3"] [--json out.json]
"""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_forward import plan_kwargs, quantized_inputs, row_inputs, rows, run_fp8_scaled  # noqa: E402
from timeline import arguments, bench_row, covered, unwrap32  # noqa: E402  (scripts/, this script's folder)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402

WGS, BLOCKS, EVENTS = 4, 1024, 10  # fp8_consumer.cuh's Fp8TraceTable (32-bit stamps)
STEPS = [  # (name, from event, to event)
    ("K wait", 0, 1), ("S turn+issue", 1, 2), ("S wait", 2, 3), ("softmax", 3, 4), ("V wait", 4, 5),
    ("PV turn+issue", 5, 6), ("PV wait", 6, 7), ("promote", 7, 8)]


def read_trace(lib_path: str) -> list:
    """The stamps per warpgroup and block, events 0-8 unwrapped onto one line of cycles (timeline.unwrap32); event 9
    packs the block's last flag (bit 31), head (bits 16-30) and query row (bits 0-15)."""
    L = ctypes.CDLL(lib_path)
    L.tw_debug_fp8_trace.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    buf = (ctypes.c_uint32 * (WGS * BLOCKS * EVENTS))()
    rc = L.tw_debug_fp8_trace(buf, ctypes.sizeof(buf))
    if rc:
        raise SystemExit(f"tw_debug_fp8_trace: CUDA error {rc}")
    raw = [[list(buf[(w * BLOCKS + n) * EVENTS:(w * BLOCKS + n + 1) * EVENTS]) for n in range(BLOCKS)]
           for w in range(WGS)]
    ref = next((b[0] for w in raw for b in w if b[0]), 0)
    return [[unwrap32(b[:9], ref) + b[9:] for b in w] for w in raw]


def main() -> None:
    args = arguments(__doc__, skip=32)
    _capi.lib(args.lib)
    row = bench_row(rows(), args.row)
    T, H, W = row.latent
    S = T * H * W + row.text
    q, k, v = row_inputs(row, 1, S, 3, "cuda")
    text_len = torch.full((1,), row.text_len, device="cuda", dtype=torch.int32)
    tl_ptr = text_len.data_ptr() if row.text else 0
    kw = plan_kwargs(row)
    plan_q, plan = _capi.Plan(precision="fp8", **kw), _capi.Plan(precision="fp8_scaled", **kw)
    inputs = quantized_inputs(plan_q, q, k, v, tl_ptr)
    o = torch.empty_like(q)
    for _ in range(5):  # warm, and the clock up; the last run's stamps are read
        run_fp8_scaled(plan, inputs, o, tl_ptr)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run_fp8_scaled(plan, inputs, o, tl_ptr)
    end.record()
    torch.cuda.synchronize()
    print(f"row {row.name}: FP8 kernel (traced run) {start.elapsed_time(end):.2f} ms")
    trace = read_trace(args.lib)
    if args.json:
        json.dump(trace, open(args.json, "w"))

    wgs = [w for w in range(WGS) if trace[w][0][8]]
    print("| warpgroup | blocks | cycles per block (median) | " + " | ".join(s[0] for s in STEPS) + " | loop back |")
    print("|---" * (len(STEPS) + 4) + "|")
    for w in wgs:
        blocks = [b for b in trace[w] if b[8]][args.skip:]
        period = [b2[0] - b1[0] for b1, b2 in zip(blocks, blocks[1:])]
        cells = [statistics.median([b[j] - b[i] for b in blocks]) for _, i, j in STEPS]
        back = statistics.median([b2[0] - b1[8] for b1, b2 in zip(blocks, blocks[1:])])
        print(f"| {w} | {len(blocks)} | {statistics.median(period):.0f} | "
              + " | ".join(f"{c:.0f}" for c in cells) + f" | {back:.0f} |")
    # Means too (medians hide the long tails of waits).
    print("\nmeans:")
    for w in wgs:
        blocks = [b for b in trace[w] if b[8]][args.skip:]
        period = [b2[0] - b1[0] for b1, b2 in zip(blocks, blocks[1:])]
        cells = [statistics.mean([b[j] - b[i] for b in blocks]) for _, i, j in STEPS]
        print(f"| {w} | {statistics.mean(period):.0f} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")

    # Overlap: for each warpgroup's softmax interval, the share of it during which another warpgroup has a GEMM
    # in flight (issued, wait not yet returned), and during which another warpgroup is in its softmax too.
    lo = max(trace[w][args.skip][0] for w in wgs)
    hi = min(max(b[8] for b in trace[w] if b[8]) for w in wgs)
    gemm = {w: [(b[1], b[3]) for b in trace[w] if b[8]] + [(b[5], b[7]) for b in trace[w] if b[8]] for w in wgs}
    soft = {w: [(b[3], b[4]) for b in trace[w] if b[8]] for w in wgs}

    all_gemm = [iv for w in wgs for iv in gemm[w]]
    print(f"\nwindow {hi - lo} cycles: some GEMM issued and not yet waited for {covered(lo, hi, all_gemm) / (hi - lo):.1%}"
          f" of it; some softmax running {covered(lo, hi, [iv for w in wgs for iv in soft[w]]) / (hi - lo):.1%}")
    for w in wgs:
        tot = others_gemm = others_soft = 0
        for a, b in soft[w]:
            if a < lo or b > hi:
                continue
            tot += b - a
            others_gemm += covered(a, b, [iv for x in wgs if x != w for iv in gemm[x]])
            others_soft += covered(a, b, [iv for x in wgs if x != w for iv in soft[x]])
        print(f"warpgroup {w}: during its softmax another's GEMM is in flight {others_gemm / tot:.1%}, another's"
              f" softmax runs {others_soft / tot:.1%}")

    # A stretch of the merged timeline (cycles from its start).
    names = ["top", "K ok", "S issued", "S done", "sm done", "V ok", "PV issued", "PV done", "promoted"]
    n0 = args.skip + 40
    t0 = min(trace[w][n0][0] for w in wgs)
    ev = sorted((trace[w][n][e] - t0, w, n, names[e]) for w in wgs for n in range(n0, n0 + 4) for e in range(9))
    print("\ntimeline (cycle, warpgroup, block, event):")
    for t, w, n, e in ev:
        print(f"{t:7d}  wg{w} b{n}  {'    ' * w}{e}")


if __name__ == "__main__":
    main()
