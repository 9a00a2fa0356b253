"""Interval arithmetic shared by the kernels' clock timelines (scripts/fp8_trace.py, scripts/bwd_trace.py)."""
from __future__ import annotations

import argparse


def unwrap32(stamps: list, ref: int) -> list:
    """32-bit clock stamps (clock_trace.cuh) as cycles on one line through `ref` (a stamp of the same run): each
    becomes the value nearest to `ref` that equals it modulo 2^32, which holds for stamps within 2^31 cycles (~1 s)
    of it. Zero (never written) stays zero."""
    return [ref + (x - ref + (1 << 31)) % (1 << 32) - (1 << 31) if x else 0 for x in stamps]


def covered(a: int, b: int, intervals: list) -> int:
    """Cycles of [a, b) inside the union of `intervals` ((start, end) pairs)."""
    pts = sorted((max(a, x), min(b, y)) for x, y in intervals if y > a and x < b)
    tot, cur = 0, a
    for x, y in pts:
        if y > cur:
            tot += y - max(x, cur)
            cur = y
    return tot


def arguments(doc: str, skip: int) -> argparse.Namespace:
    """The timeline scripts' command line: the traced library, the benchmark row, the blocks to skip, a JSON dump."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", required=True)
    ap.add_argument("--row", default="30x48x80 w3x3x3")
    ap.add_argument("--skip", type=int, default=skip, help="blocks left out of the statistics at the start")
    ap.add_argument("--json", help="write the raw stamps here")
    return ap.parse_args()


def bench_row(rows: list, name: str):
    """The benchmark row (bench_forward.rows()) whose name contains `name`; "30x48x80 w3x3x3" names a row and its
    "+text" sibling, which "+text" in `name` tells apart."""
    cands = [r for r in rows if name in r.name]
    if len(cands) > 1:
        cands = [r for r in cands if ("+text" in r.name) == ("+text" in name)]
    if not cands:
        raise SystemExit(f"--row {name!r}: no benchmark row of bench_forward.py has that in its name")
    return cands[0]
