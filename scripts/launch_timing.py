#!/usr/bin/env python3
"""Per-launch CUDA-event times of the HunyuanVideo row-1 problem with and without text, back to back and with an
L2 flush between launches: shows how the 700 W power cap moves a kernel's time from launch to launch (run
nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv -lms 500 beside it). docs/performance.md, v4.

Usage: python3 scripts/launch_timing.py LIB
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi
_capi.lib(sys.argv[1])
latent, heads, D = (30, 48, 80), 24, 128
nv = 30*48*80
flush = torch.empty(256*1024*1024//4, dtype=torch.int32, device="cuda")
for cap, length in [(0, 0), (256, 0), (256, 128), (256, 226), (256, 256), (0, 0)]:
    S = nv + cap
    q, k, v = (torch.randn(1, S, heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    tl = torch.full((1,), length, device="cuda", dtype=torch.int32)
    plan = _capi.Plan(batch=1, q_heads=heads, kv_heads=heads, head_dim=D, dtype="bf16", latent=latent, tile=(6, 8, 8),
                      text_capacity=cap, pattern="sliding_tile", windows=[(3, 3, 3)], device="cuda")
    run = lambda: plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), 0, tl.data_ptr() if cap else 0,
                           torch.cuda.current_stream().cuda_stream)
    for mode in ("b2b", "flush"):
        ts = []
        for i in range(16):
            if mode == "flush": flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); run(); b.record()
            ts.append((a, b))
        torch.cuda.synchronize()
        ms = [a.elapsed_time(b) for a, b in ts]
        print(f"cap {cap} len {length} {mode}: " + " ".join(f"{x:.1f}" for x in ms), flush=True)
