#!/usr/bin/env python3
"""The backward reduce kernel's timeline: where one CTA's consumer warpgroups, loaders and dQ reducer spend their
cycles, block by block and at the item boundaries.

Needs a library built with -DTILEWISE_HOPPER_BWD_TRACE=1 (scripts/kernel_variants.py BUILD OUT
trace=-DTILEWISE_HOPPER_BWD_TRACE=1; optionally -DTILEWISE_HOPPER_BWD_TRACE_CTA=N for another CTA): the first warp of
each consumer warpgroup, the Q and dO loaders and the dQ reducer of that CTA stamp the SM clock's low word at each
step of their first 2048 streamed blocks and 256 items (src/backends/cuda/hopper/bwd/bwd_trace.cuh). Runs one
benchmark row's backward (after warm-up runs), reads the stamps back and prints, per warpgroup, the median and mean
cycles of each step, the dQ turn's parts, the item boundary's parts, how long the tensor cores may be idle (no
warpgroup between a GEMM's issue and its wait's return) and a stretch of the merged timeline.

The floor per block: a 64-row streamed block against 128 owned keys is 10.5 MFLOP (S^T, dP^T, dV, dK: 4 x 2 x 64 x
128 x 128; dQ: 2 x 64 x 128 x 128), 2560 cycles at the dense bf16 rate of 4096 FLOP per cycle and SM.

Usage: python3 scripts/bwd_trace.py --lib /tmp/bv/trace/libtilewise.so [--row "30x48x80 w3x3x3"] [--json out.json]
"""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_backward import TilewiseRun  # noqa: E402
from bench_forward import row_inputs, rows  # noqa: E402
from timeline import arguments, bench_row, covered, unwrap32  # noqa: E402  (scripts/, this script's folder)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402

ROLES, BLOCKS, EVENTS = 5, 2048, 16  # bwd_trace.cuh's BwdTraceTable
ITEM_ROLES, ITEMS, ITEM_EVENTS = 3, 256, 14
FLOOR_CYCLES = 4 * 2 * 64 * 128 * 128 * 1.25 / 4096
# Consumer events per block (bwd_consumer.cuh's dkdv_item): 0 top, 1 stages full, 2 S^T and dP^T issued, 3 S^T done,
# 4 P^T done (D loaded), 5 dP^T done (dV issued before), 6 dS^T stored, 7 dV and dK done, 8 stages released;
# block m's dQ product (by warpgroup m % 2, in block m + 1's iteration or at the item's end): 9 its dS^T complete,
# 10 product done, 11 the staging buffer free, 12 staged; 13 flags (item << 8 | dQ turn << 1 | last).
STEPS = [("stage wait", 0, 1), ("issue", 1, 2), ("S^T wait", 2, 3), ("P^T", 3, 4), ("dP^T wait", 4, 5),
         ("dS^T", 5, 6), ("dV dK wait", 6, 7), ("release", 7, 8)]
DQ_STEPS = [("dS^T wait", 9), ("dQ GEMM", 10), ("staging wait", 11), ("staging", 12)]
# Producer events per block: Q loader 0 before k_empty's wait, 1 after, 2 record written (tail zeroed), 3 loads
# issued; dO loader likewise with v_empty; dQ reducer 0 before dq_full's wait, 1 after, 2 reductions issued, 3 read
# out of the staging buffer.
# Consumer item events: 0 before the ring, 1 owned K and V landed, 2 row record read, 3 accumulators zeroed,
# 4 the item's first block number, 5 after its last block, 6 its last dQ done and the owned blocks freed,
# 7 dK and dV stored, 8 (D 128's staged stores) dK staged and its copies issued, 9 the last dQ turn read out of the
# staging buffer (dV's wait); inside each gradient's staged stores, 10 (dK) / 12 (dV) its rows' shared stores
# issued, 11 / 13 the fence and the warp's barrier passed (the copies follow). Q loader item events: 0 before the
# ring, 1 item taken, 2 owned blocks free, 3 their loads issued.


def d(a: int, b: int) -> int:
    """Cycles from stamp a to stamp b (32-bit clock words)."""
    return (b - a) % (1 << 32)


def read_trace(lib: ctypes.CDLL, clear: bool) -> tuple[list, list]:
    n_blocks, n_items = ROLES * BLOCKS * EVENTS, ITEM_ROLES * ITEMS * ITEM_EVENTS
    buf = (ctypes.c_uint32 * (n_blocks + n_items))()
    rc = lib.tw_debug_bwd_trace(buf, ctypes.sizeof(buf), int(clear))
    if rc:
        raise SystemExit(f"tw_debug_bwd_trace: CUDA error {rc}")
    blocks = [[list(buf[((r * BLOCKS) + n) * EVENTS:((r * BLOCKS) + n + 1) * EVENTS]) for n in range(BLOCKS)]
              for r in range(ROLES)]
    items = [[list(buf[n_blocks + ((r * ITEMS) + i) * ITEM_EVENTS:n_blocks + ((r * ITEMS) + i + 1) * ITEM_EVENTS])
              for i in range(ITEMS)] for r in range(ITEM_ROLES)]
    return blocks, items


def linear(blocks: list, items: list) -> tuple[list, list]:
    """The stamps unwrapped onto one line of cycles (timeline.unwrap32, as fp8_trace.py reads its own), so that stamps
    of different roles can be compared across a wrap of the 32-bit clock (the window's ends below); the consumers'
    flags (block event 13) and the items' first block numbers (item event 4) are not stamps."""
    ref = next((b[0] for b in blocks[0] if b[0]), 0)
    return ([[unwrap32(b[:13], ref) + b[13:] for b in role] for role in blocks],
            [[unwrap32(it[:4], ref) + it[4:5] + unwrap32(it[5:], ref) for it in role] for role in items])


def summary(values: list) -> str:
    return f"{statistics.median(values):.0f} / {statistics.mean(values):.0f}" if values else "-"


def main() -> None:
    args = arguments(__doc__, skip=16)
    lib = _capi.lib(args.lib)
    lib.tw_debug_bwd_trace.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    row = bench_row(rows(), args.row)
    T, H, W = row.latent
    S = T * H * W + row.text
    q, k, v, dout = row_inputs(row, 1, S, 4, "cuda")
    text_len = torch.full((1,), row.text_len, device="cuda", dtype=torch.int32)
    run = TilewiseRun(row, q, k, v, dout, text_len, deterministic=False)
    run.forward()
    for _ in range(4):  # warm, and the clock up
        run.backward()
    torch.cuda.synchronize()
    read_trace(lib, clear=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run.backward()
    end.record()
    torch.cuda.synchronize()
    print(f"row {row.name}: backward (traced run) {start.elapsed_time(end):.2f} ms")
    blocks, items = read_trace(lib, clear=False)
    if args.json:
        json.dump({"blocks": blocks, "items": items}, open(args.json, "w"))

    analyse(blocks, items, args.skip)


def analyse(blocks: list, items: list, skip: int) -> None:
    """Prints the tables and the timeline of one traced run."""
    blocks, items = linear(blocks, items)
    def count(r: int) -> int:
        return max((n + 1 for n in range(BLOCKS) if blocks[r][n][8] or blocks[r][n][0]), default=0)

    n_wg = [count(0), count(1)]
    print(f"blocks traced: warpgroup 0 {n_wg[0]}, 1 {n_wg[1]}; floor {FLOOR_CYCLES:.0f} cycles per block "
          "(dense bf16 rate)")
    print("\ncycles per block, median / mean:")
    print("| warpgroup | period | " + " | ".join(s[0] for s in STEPS) + " | dQ turn | " +
          " | ".join(s[0] for s in DQ_STEPS) + " | after staging |")
    print("|---" * (len(STEPS) + len(DQ_STEPS) + 4) + "|")
    for w in (0, 1):
        n = min(n_wg[w], BLOCKS) - 1
        idx = [i for i in range(skip, n) if not blocks[w][i][13] & 1]  # inside items: not an item's last block
        period = [d(blocks[w][i][0], blocks[w][i + 1][0]) for i in idx]
        cells = [summary([d(blocks[w][i][a], blocks[w][i][b]) for i in idx]) for _, a, b in STEPS]
        turns = [i for i in idx if blocks[w][i][13] & 2 and i > 0]
        turn = summary([d(blocks[w][i][8], blocks[w][i + 1][0]) for i in turns])
        no_turn = summary([d(blocks[w][i][8], blocks[w][i + 1][0]) for i in idx if not blocks[w][i][13] & 2])
        def dq_steps(i: int) -> list:  # block i's turn computes block i - 1's dQ, whose events sit in slot i - 1
            m = blocks[w][i - 1]
            return [d(a, m[e]) for a, (_, e) in zip([blocks[w][i][8], m[9], m[10], m[11]], DQ_STEPS)]

        dq = [summary(list(col)) for col in zip(*[dq_steps(i) for i in turns])] if turns else ["-"] * len(DQ_STEPS)
        after = summary([d(blocks[w][i - 1][12], blocks[w][i + 1][0]) for i in turns])
        print(f"| {w} | {summary(period)} | " + " | ".join(cells) + f" | {turn} (none: {no_turn}) | " +
              " | ".join(dq) + f" | {after} |")

    # The tensor cores' possible idle time: no warpgroup between a GEMM's issue and its wait's return.
    lo = max(blocks[w][skip][0] for w in (0, 1))
    hi = min(blocks[w][n_wg[w] - 1][8] for w in (0, 1))

    def rel(x: int) -> int:  # cycles since the window's start
        return d(lo, x)

    gemm = []
    for w in (0, 1):
        for i in range(n_wg[w]):
            b = blocks[w][i]
            if not b[8]:
                continue
            gemm.append((rel(b[1]), rel(b[7])))  # S^T issued (after the stage wait) .. dV, dK done
            if b[9] and b[10]:
                gemm.append((rel(b[9]), rel(b[10])))
    window = d(lo, hi)
    busy = covered(0, window, gemm)
    print(f"\nwindow {window} cycles ({n_wg[0]} blocks): some GEMM in flight {busy / window:.1%}, none "
          f"{1 - busy / window:.1%}; floor / period {FLOOR_CYCLES * (n_wg[0] - skip) / window:.1%}")

    # The staged stores split (D 128): per gradient, the shared stores' issue, the fence and barrier, the copies.
    split = [("dK stores issued", 6, 10), ("dK fence + barrier", 10, 11), ("dK copies", 11, 8),
             ("dV stores issued", 9, 12), ("dV fence + barrier", 12, 13), ("dV copies", 13, 7)]
    split_rows = []
    for w in (0, 1):
        its = [items[w][i] for i in range(ITEMS) if all(items[w][i][e] for e in (6, 7, 8, 9, 10, 11, 12, 13))]
        if its:
            split_rows.append(f"| {w} | {len(its)} | " +
                              " | ".join(summary([d(it[a], it[b]) for it in its]) for _, a, b in split) + " |")
    if split_rows:
        print("\nthe staged dK / dV stores split, cycles, median / mean:")
        print("| warpgroup | items | " + " | ".join(name for name, _, _ in split) + " |")
        print("|---" * (len(split) + 2) + "|")
        print("\n".join(split_rows))

    # Item boundaries (consumers): from an item's last block's GEMMs to the next item's first issue.
    print("\nitem boundary, cycles, median / mean over the traced items (consumer warpgroups):")
    parts = [(name, None) for name in ("last block done -> loop end", "last dQ + owned freed", "dK dV stores",
                                       "of which dK", "dV wait", "next ring", "owned K V wait", "row record",
                                       "zero + ldmatrix", "first stage wait", "first issue", "total")]
    print("| warpgroup | items | " + " | ".join(p[0] for p in parts) + " | blocks per item |")
    print("|---" * (len(parts) + 3) + "|")
    for w in (0, 1):
        its = [i for i in range(ITEMS - 1) if items[w][i][7] and items[w][i + 1][3]]
        cols = {p[0]: [] for p in parts}
        nblocks = []
        for i in its:
            it, nx = items[w][i], items[w][i + 1]
            first, nfirst = it[4], nx[4]
            if nfirst == 0 or nfirst >= BLOCKS or first >= BLOCKS:
                continue
            last = nfirst - 1
            lb, fb = blocks[w][last], blocks[w][nfirst]
            if not lb[8] or not fb[2]:
                continue
            nblocks.append(nfirst - first)
            for name, x in [("last block done -> loop end", d(lb[7], it[5])), ("last dQ + owned freed", d(it[5], it[6])),
                            ("dK dV stores", d(it[6], it[7])),
                            ("of which dK", d(it[6], it[8]) if it[8] else None),
                            ("dV wait", d(it[8], it[9]) if it[8] and it[9] else None), ("next ring", d(it[7], nx[0])),
                            ("owned K V wait", d(nx[0], nx[1])), ("row record", d(nx[1], nx[2])),
                            ("zero + ldmatrix", d(nx[2], nx[3])), ("first stage wait", d(fb[0], fb[1])),
                            ("first issue", d(nx[3], fb[2]))]:
                if x is not None:
                    cols[name].append(x)
            cols["total"].append(d(lb[7], fb[2]))
        if nblocks:
            print(f"| {w} | {len(nblocks)} | " + " | ".join(summary(cols[p[0]]) for p in parts) +
                  f" | {statistics.mean(nblocks):.1f} |")

    # The item's last dQ turn (dkdv_item's end, by the warpgroup whose turn it is): what q_empty, and so the next
    # item's owned loads, wait for. Block m's turn needs the reducer to have read block m - 1's staging out.
    print("\nthe item's last dQ turn (its warpgroup), cycles, median / mean; the reducer on the block before it:")
    print("| warpgroup | turns | loop end -> dS^T there | dQ GEMM | staging wait | staging | -> owned freed | "
          "block m-1: staged -> reducer's wait done | -> reductions issued | -> read out | block m (the last): "
          "staged -> reducer's wait done | -> issued | -> read out |")
    print("|---" * 13 + "|")
    for w in (0, 1):
        cols = [[] for _ in range(11)]
        for i in range(ITEMS - 1):
            it, nx = items[w][i], items[w][i + 1]
            m = nx[4] - 1
            if not (it[5] and it[6]) or nx[4] == 0 or m < 1 or m >= BLOCKS or m % 2 != w:
                continue
            lb, prev, red, last = blocks[w][m], blocks[1 - w][m - 1], blocks[4][m - 1], blocks[4][m]
            if not (lb[9] and lb[12] and prev[12] and red[3] and last[3]):
                continue
            for c, x in enumerate([d(it[5], lb[9]), d(lb[9], lb[10]), d(lb[10], lb[11]), d(lb[11], lb[12]),
                                   d(lb[12], it[6]), d(prev[12], red[1]), d(red[1], red[2]), d(red[2], red[3]),
                                   d(lb[12], last[1]), d(last[1], last[2]), d(last[2], last[3])]):
                cols[c].append(x)
        if cols[0]:
            print(f"| {w} | {len(cols[0])} | " + " | ".join(summary(c) for c in cols) + " |")

    # Producer threads.
    print("\nproducer threads, cycles per block, median / mean:")
    for r, name, steps in [(2, "Q loader", [("k_empty wait", 0, 1), ("describe", 1, 2), ("TMA issue", 2, 3)]),
                           (3, "dO loader", [("v_empty wait", 0, 1), ("zero tail", 1, 2), ("TMA issue", 2, 3)]),
                           (4, "dQ reducer", [("dq_full wait (+ loads)", 0, 1), ("issue", 1, 2),
                                              ("read out", 2, 3)])]:
        n = count(r)
        if n < skip + 2:
            continue
        idx = range(skip, n - 1)
        period = summary([d(blocks[r][i][0], blocks[r][i + 1][0]) for i in idx])
        print(f"{name}: period {period}; " + "; ".join(
            f"{s} {summary([d(blocks[r][i][a], blocks[r][i][b]) for i in idx])}" for s, a, b in steps))
    qi = [i for i in range(ITEMS) if items[2][i][3]]
    if qi:
        print("Q loader per item: owned blocks free after " +
              summary([d(items[2][i][1], items[2][i][2]) for i in qi]) + " cycles (median / mean)")

    # A stretch of the merged timeline around the first traced item boundary after the skip.
    names = ["top", "stages", "issued", "S^T", "P^T", "dP^T", "dS^T", "dVdK", "released", "dq:dS", "dq:gemm",
             "dq:free", "dq:staged"]
    b0 = next((items[0][i][4] for i in range(1, ITEMS) if items[0][i][4] > skip), skip + 8)
    ev = []
    for w in (0, 1):
        for n in range(max(0, b0 - 3), min(b0 + 3, n_wg[w])):
            for e in range(13):
                if blocks[w][n][e]:
                    ev.append((rel(blocks[w][n][e]), w, n, names[e]))
    for w in (0, 1):
        for i in range(ITEMS):
            if items[w][i][4] == b0:
                for e, nm in [(0, "item:ring"), (1, "item:ownedKV"), (2, "item:rows"), (3, "item:zeroed")]:
                    ev.append((rel(items[w][i][e]), w, b0, nm))
                for e, nm in [(5, "item:loop end"), (6, "item:last dq"), (8, "item:dK staged"), (9, "item:dV free"),
                              (7, "item:stored")]:
                    if i > 0:
                        ev.append((rel(items[w][i - 1][e]), w, b0 - 1, nm))
    ev.sort()
    t0 = ev[0][0] if ev else 0
    print(f"\ntimeline around block {b0} (an item's first; cycle, warpgroup, block, event):")
    for t, w, n, e in ev:
        print(f"{t - t0:8d}  wg{w} b{n:<5d} {'              ' * w}{e}", flush=True)


if __name__ == "__main__":
    main()
