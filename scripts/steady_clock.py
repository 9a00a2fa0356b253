#!/usr/bin/env python3
"""SM clock and power of the card while tilewise (row 1) and cuDNN SDPA (dense, same shape) each run back to back
for a few seconds: under the 700 W cap the clock is set by energy per unit of work, so FLOPs per SM cycle at the
steady state tell per-cycle efficiency apart from energy (docs/performance.md, v4.1).

Usage: python3 scripts/steady_clock.py LIB [--seconds 4] [--text 0]
"""
import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("lib")
ap.add_argument("--seconds", type=float, default=4.0)
ap.add_argument("--text", type=int, default=0)
ap.add_argument("--text-len", type=int, default=226)
a = ap.parse_args()
_capi.lib(a.lib)

latent, heads, D = (30, 48, 80), 24, 128
S = latent[0] * latent[1] * latent[2] + a.text
q, k, v = (torch.randn(1, S, heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
o = torch.empty_like(q)
tl = torch.full((1,), a.text_len, device="cuda", dtype=torch.int32)
plan = _capi.Plan(batch=1, q_heads=heads, kv_heads=heads, head_dim=D, dtype="bf16", latent=latent, tile=(6, 8, 8),
                  text_capacity=a.text, pattern="sliding_tile", windows=[(3, 3, 3)], device="cuda")
stream = torch.cuda.current_stream().cuda_stream
tw = lambda: plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), 0, tl.data_ptr() if a.text else 0,
                      stream)
qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))


def cudnn():
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        F.scaled_dot_product_attention(qt, kt, vt)


cases = [("tilewise row 1", tw, plan.flops([a.text_len] if a.text else None)),
         ("cuDNN SDPA dense", cudnn, 4.0 * D * S * S * heads)]
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                        "-lms", "100"], stdout=subprocess.PIPE, text=True)
spans = []
for name, fn, flops in cases:
    fn(); torch.cuda.synchronize()
    t0 = time.time()
    n = 0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while time.time() - t0 < 1.0:  # reach the power-capped state first
        fn(); torch.cuda.synchronize()
    ts = time.time()
    start.record()
    while time.time() - ts < a.seconds:
        fn(); n += 1
        if n % 4 == 0: torch.cuda.synchronize()
    end.record(); torch.cuda.synchronize()
    spans.append((name, ts, time.time(), start.elapsed_time(end) / n, flops))
    time.sleep(1.0)  # a pause between cases so one's heat does not bleed into the next's first samples
smi.terminate()
samples = []
for line in smi.stdout.read().splitlines():
    try:
        stamp, clk, pw = [x.strip() for x in line.split(",")]
        t = time.mktime(time.strptime(stamp.split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + stamp.split(".")[1])
        samples.append((t, float(clk), float(pw)))
    except (ValueError, IndexError):
        pass
print("| kernel | ms | TFLOP/s | mean SM MHz | mean W | FLOP per SM cycle (of 4096) |")
print("|---|---|---|---|---|---|")
for name, t0, t1, ms, flops in spans:
    sel = [(c, p) for t, c, p in samples if t0 <= t <= t1]
    if not sel:
        print(f"| {name} | {ms:.2f} | {flops / ms / 1e9:.0f} | n/a | n/a | n/a |")
        continue
    mhz = sum(c for c, _ in sel) / len(sel)
    watts = sum(p for _, p in sel) / len(sel)
    per_cycle = flops / (ms * 1e-3) / (132 * mhz * 1e6)
    print(f"| {name} | {ms:.2f} | {flops / ms / 1e9:.0f} | {mhz:.0f} | {watts:.0f} "
          f"| {per_cycle:.0f} ({per_cycle / 4096:.1%}) |")
