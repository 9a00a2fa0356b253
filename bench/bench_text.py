#!/usr/bin/env python3
"""What text tokens cost: HunyuanVideo 30x48x80, 24 heads, D 128, window 3x3x3, with the text capacity and the
valid length varied one step at a time, so each row adds one kind of work to the one above:

  no text                      the video rows only
  capacity 256, length 0       + the text query rows (dense over the video keys)
  capacity 256, length 128     + one whole text key block per video query block
  capacity 256, length 226     + a second, masked text key block (HunyuanVideo's case)
  capacity 256, length 256     the second block whole (no mask)

Columns: median ms, effective TFLOP/s (allowed pairs), the step's extra ms and the extra ms its FLOPs would
cost at the no-text row's rate.

Usage: python3 bench/bench_text.py [--lib build/libtilewise.so] [--heads 24] [--out table.md]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_forward import bench  # noqa: E402
from report import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=None)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    _capi.lib(a.lib)
    latent, heads, D = (30, 48, 80), a.heads, 128
    nv = latent[0] * latent[1] * latent[2]
    rows = []
    prev = None
    for cap, length in [(0, 0), (256, 0), (256, 128), (256, 226), (256, 256)]:
        S = nv + cap
        q, k, v = (torch.randn(1, S, heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        o = torch.empty_like(q)
        text_len = torch.full((1,), length, device="cuda", dtype=torch.int32)
        plan = _capi.Plan(batch=1, q_heads=heads, kv_heads=heads, head_dim=D, dtype="bf16", latent=latent,
                          tile=(6, 8, 8), text_capacity=cap, pattern="sliding_tile", windows=[(3, 3, 3)],
                          device="cuda")
        flops = plan.flops([length] if cap else None)
        tl = text_len.data_ptr() if cap else 0
        ms = bench(lambda: plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), 0, tl,
                                    torch.cuda.current_stream().cuda_stream))
        name = "no text" if cap == 0 else f"capacity {cap}, length {length}"
        if prev is None:
            base_rate = flops / ms
            rows.append((name, ms, flops / ms / 1e9, float("nan"), float("nan")))
        else:
            rows.append((name, ms, flops / ms / 1e9, ms - prev[0], (flops - prev[1]) / base_rate))
        prev = (ms, flops)
        print(f"  done: {name}: {ms:.2f} ms", flush=True)
        del q, k, v, o
        torch.cuda.empty_cache()
    lines = ["| text | ms | eff TFLOP/s | extra ms (this step) | extra ms at the no-text rate |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {ms:.2f} | {tf:.0f} | {d:+.2f} | {e:+.2f} |" for n, ms, tf, d, e in rows]
    emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
