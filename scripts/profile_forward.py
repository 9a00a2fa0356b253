#!/usr/bin/env python3
"""One forward launch of a benchmark problem, for ncu: a warm-up run, then the profiled run.

    ncu --launch-skip 1 --launch-count 1 -k regex:forward_kernel python3 scripts/profile_forward.py LIB [--heads 4]
        [--precision fp8]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402


def problem_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments that say which problem to profile (scripts/profile_backward.py takes them too)."""
    ap.add_argument("lib")
    ap.add_argument("--latent", default="30x48x80")
    ap.add_argument("--tile", default="6x8x8")
    ap.add_argument("--window", default="3x3x3")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    return ap


def print_passes(fn, passes: int, title: str) -> None:
    """Runs fn `passes` times under torch.profiler and prints one table: the device time of each kernel and memset
    per run (mean over the runs), largest first, e.g. the FP8 forward's quantisation passes beside its kernel or the
    backward's preprocess, main kernel and dQ conversion."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            fn()
        torch.cuda.synchronize()
    rows = [(e.device_time_total / passes / 1e3, e.count // passes, e.key) for e in prof.key_averages()
            if e.device_time_total > 0]
    print(f"| pass ({title}) | per run | ms |\n|---|---|---|")
    for ms, count, key in sorted(rows, reverse=True):
        print(f"| {key[:90]} | {count} | {ms:.3f} |")
    print(f"| total | | {sum(r[0] for r in rows):.3f} |")


def dims(text: str) -> tuple:
    return tuple(int(x) for x in text.split("x"))


def main() -> None:
    ap = problem_args(argparse.ArgumentParser())
    ap.add_argument("--text", type=int, default=0)
    ap.add_argument("--text-len", type=int, default=-1, help="valid text rows (device array); -1 = the capacity")
    ap.add_argument("--text-first", action="store_true", help="text tokens before the video (CogVideoX)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cudnn", action="store_true",
                    help="run PyTorch SDPA (cuDNN backend, dense) on the same shape instead")
    ap.add_argument("--passes", type=int, default=0,
                    help="N forwards under torch.profiler (no ncu): device ms per kernel and memset")
    ap.add_argument("--precision", default="native", choices=("native", "fp8"),
                    help="fp8: the FP8 forward (its quantisation passes, V^T pack and fp8_forward_kernel, which -k "
                         "regex:forward_kernel also matches)")
    a = ap.parse_args()
    _capi.lib(a.lib)
    latent, tile, window = dims(a.latent), dims(a.tile), dims(a.window)
    S = latent[0] * latent[1] * latent[2] + a.text
    q, k, v = (torch.randn(1, S, a.heads, a.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    plan = _capi.Plan(batch=1, q_heads=a.heads, kv_heads=a.heads, head_dim=a.head_dim, dtype="bf16", latent=latent,
                      tile=tile, text_capacity=a.text, text_position="first" if a.text_first else "last",
                      pattern="sliding_tile", windows=[window], device="cuda", precision=a.precision)
    text_len = torch.full((1,), a.text_len, device="cuda", dtype=torch.int32)
    tl = text_len.data_ptr() if a.text_len >= 0 else 0
    if a.cudnn:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for _ in range(a.runs):
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        torch.cuda.synchronize()
        print("ok cudnn", tuple(o.shape))
        return
    def forward():
        plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), 0, tl)

    for _ in range(a.runs):
        forward()
    torch.cuda.synchronize()
    if a.passes:
        print_passes(forward, a.passes, f"{S} tokens, {a.heads} heads, {a.precision}")
        return
    print("ok", tuple(o.shape), float(o.float().abs().mean()))


if __name__ == "__main__":
    main()
