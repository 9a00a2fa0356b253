#!/usr/bin/env python3
"""Row 1's backward (or another sliding-tile problem) under several configurations in one process, alternated: a
library, environment settings in force while its plan is made, and the SMs the kernels may use (sm_margin). For
comparing arrangements that cannot use every SM (clusters of three hold 117 of the H200's 132) against the default
on the same number of SMs (docs/performance.md, backward v3.35).

    python3 scripts/backward_per_sm.py --config default=build/libtilewise.so \\
        --config default117=build/libtilewise.so:15 --config cl3=bv/cl3/libtilewise.so@TILEWISE_BACKWARD_CLUSTER=1
"""
import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_forward import variant_environment  # noqa: E402


def config(text: str):
    """NAME=LIB[@VAR=VALUE...][:SM_MARGIN] -> (name, LIB[@VAR=VALUE...] as bench_forward's --variants take it,
    sm_margin)."""
    name, rest = text.split("=", 1)
    margin = 0
    if ":" in rest:
        rest, m = rest.rsplit(":", 1)
        margin = int(m)
    return name, rest, margin


ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--config", type=config, action="append", required=True, help="NAME=LIB[@VAR=VALUE...][:SM_MARGIN]")
ap.add_argument("--latent", default="30x48x80")
ap.add_argument("--tile", default="6x8x8")
ap.add_argument("--window", default="3x3x3")
ap.add_argument("--heads", type=int, default=24)
ap.add_argument("--repeats", type=int, default=3)
a = ap.parse_args()
dims = lambda s: tuple(int(x) for x in s.split("x"))  # noqa: E731
latent = dims(a.latent)
S = latent[0] * latent[1] * latent[2]
q, k, v, do = (torch.randn(1, S, a.heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
runs = {}
for name, lib, margin in a.config:
    with variant_environment(lib, lib.split("@")[0]):  # (the library and its settings while the plan is made)
        plan = _capi.Plan(batch=1, q_heads=a.heads, kv_heads=a.heads, head_dim=128, dtype="bf16", latent=latent,
                          tile=dims(a.tile), text_capacity=0, text_position="last", pattern="sliding_tile",
                          windows=[dims(a.window)], device="cuda", sm_margin=margin)
    o = torch.empty_like(q)
    lse = torch.empty(1, a.heads, S, device="cuda", dtype=torch.float32)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    ws = torch.empty(max(plan.backward_workspace_bytes(), 1), device="cuda", dtype=torch.uint8)
    plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), 0)

    def backward(plan=plan, o=o, lse=lse, dq=dq, dk=dk, dv=dv, ws=ws):
        plan.run_backward(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), o=o.data_ptr(), lse=lse.data_ptr(),
                          dout=do.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(), text_len=0,
                          workspace=ws.data_ptr(), deterministic=False, stream=torch.cuda.current_stream().cuda_stream)
    runs[name] = (backward, dq)
times = {name: [] for name in runs}
for _ in range(a.repeats):
    for name, (fn, _) in runs.items():
        times[name].append(do_bench(fn, warmup=200, rep=1000))
first = next(iter(runs))
print(f"| config | SMs left free | ms ({a.repeats} repeats) | max abs dq difference from {first} |\n|---|---|---|---|")
for name, _, margin in a.config:
    diff = (runs[name][1].float() - runs[first][1].float()).abs().max().item()
    print(f"| {name} | {margin} | {' / '.join(f'{t:.2f}' for t in times[name])} | {diff:.3g} |")
