#!/usr/bin/env python3
"""The same benchmark row's backward (and forward) on [B, S, H, D] and [B, H, S, D] tensors, alternated in one
process (A B A B ...), so that a difference between the layouts is not the place of a row in the benchmark's run
(heat, clocks). Prints each repeat's median ms and the mean per layout.

Usage: python3 scripts/layout_ab.py [--lib build/libtilewise.so] [--row "30x48x80 w3x3x3"] [--repeats 3]"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_backward import TilewiseRun  # noqa: E402
from bench_forward import bench, row_inputs, rows  # noqa: E402
from timeline import bench_row  # noqa: E402  (scripts/, this script's folder)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default="build/libtilewise.so")
    ap.add_argument("--row", default="30x48x80 w3x3x3")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    _capi.lib(args.lib)
    base = bench_row([r for r in rows() if r.layout == "bshd"], args.row)
    runs = {}
    for layout in ("bshd", "bhsd"):
        row = dataclasses.replace(base, layout=layout)
        S = row.latent[0] * row.latent[1] * row.latent[2] + row.text
        q, k, v, dout = row_inputs(row, 1, S, 4, "cuda")
        text_len = torch.full((1,), row.text_len, device="cuda", dtype=torch.int32)
        runs[layout] = TilewiseRun(row, q, k, v, dout, text_len, deterministic=False)
        runs[layout].forward()
    times = {(layout, what): [] for layout in runs for what in ("bwd", "fwd")}
    for _ in range(args.repeats):
        for layout, run in runs.items():
            times[(layout, "bwd")].append(bench(run.backward))
            times[(layout, "fwd")].append(bench(run.forward))
    print(f"row {base.name}, {args.repeats} alternations, ms (median of each)")
    print("| layout | backward | mean | forward | mean |\n|---|---|---|---|---|")
    for layout in runs:
        b, f = times[(layout, "bwd")], times[(layout, "fwd")]
        print(f"| {layout} | {' / '.join(f'{t:.2f}' for t in b)} | {statistics.mean(b):.2f} | "
              f"{' / '.join(f'{t:.2f}' for t in f)} | {statistics.mean(f):.2f} |")


if __name__ == "__main__":
    main()
