#!/usr/bin/env python3
"""Cost of calibration on the GPU: tilewise.calibrate.evaluate() of one (step, layer) against the attention
calls it cannot avoid.

Problem (defaults): HunyuanVideo 720p, latent 30x48x80, tile 6x8x8, 24 heads, head dim 128, bfloat16, batch 1,
256 text positions of which 226 valid, text last; random q, k, v on the GPU. Six candidate windows (legal for
the 5x6x10 tile grid, none dense): 3x3x3, 3x5x5, 3x6x10, 5x3x5, 5x6x5, 1x6x10.

- evaluate: cal.evaluate(q, k, v, geometry, candidates): dense once, each candidate once, the per-head error
  reduction on the device, one device-to-host copy of the [1 + 2C, H] sums.
- 7 calls: tilewise.dense_attention + the 6 tilewise.sliding_tile_attention calls on the same tensors.

Each is timed with CUDA events after a warm-up (plans, cost model, allocator), median of --iters. The goal is
evaluate <= 1.2 x the 7 calls. Also printed: each call alone, the reduction alone, and the host syncs seen by
torch's sync debug mode during one evaluate() (expected: 1, the final copy).

Usage: python3 bench/bench_calibrate.py --lib build-device/libtilewise.so [--iters 3] [--out table.md]
       (smoke test without a GPU: --device cpu --latent 4x8x8 --tile 2x4x4 --heads 2 --head-dim 64 --text 16
        --text-len 10 --candidates 1x1x1,2x1x1,1x2x2)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import emit  # noqa: E402

GOAL = 1.2


def triple(text: str) -> tuple:
    parts = tuple(int(x) for x in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected AxBxC, got {text!r}")
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=None, help="path to libtilewise.so (else TILEWISE_LIBRARY or the package's)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--iters", type=int, default=3, help="timed repetitions (median), after one warm-up")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--latent", type=triple, default=(30, 48, 80))
    ap.add_argument("--tile", type=triple, default=(6, 8, 8))
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text", type=int, default=256, help="text positions (after the video)")
    ap.add_argument("--text-len", type=int, default=226, help="valid text positions")
    ap.add_argument("--candidates", default="3x3x3,3x5x5,3x6x10,5x3x5,5x6x5,1x6x10")
    args = ap.parse_args()
    if args.lib:
        os.environ["TILEWISE_LIBRARY"] = os.path.abspath(args.lib)

    import numpy as np
    import torch

    import tilewise
    import tilewise.calibrate as cal
    from tilewise.calibrate import _backend

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            print("bench_calibrate: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
            return 1
        major, minor = torch.cuda.get_device_capability(device)
        if major != 9:
            print(f"bench_calibrate: {torch.cuda.get_device_name(device)} is sm_{major}{minor}; tilewise's CUDA "
                  "kernel needs a Hopper GPU (sm_90)", file=sys.stderr)
            return 1
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        """Median milliseconds of --iters calls after one warm-up call."""
        fn()
        sync()
        times = []
        for _ in range(max(1, args.iters)):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    B, H, D = args.batch, args.heads, args.head_dim
    S = args.latent[0] * args.latent[1] * args.latent[2] + args.text
    dtype = getattr(torch, args.dtype)
    geometry = cal.Geometry(latent=args.latent, tile=args.tile, text_len=args.text_len if args.text else None,
                            text_position="last")
    windows = [cal.canonical_window(c, geometry.grid) for c in cal.parse_windows(args.candidates)]
    if len(set(windows)) != len(windows) or geometry.grid in windows:
        print(f"bench_calibrate: candidates {args.candidates} clamped to the grid {geometry.grid} are {windows}: "
              "expected distinct, sparse windows", file=sys.stderr)
        return 1
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=gen, device=device, dtype=dtype) for _ in range(3))
    kw = geometry.kwargs()
    text_len = geometry.text_len_list(B)  # the form evaluate() passes: host ints, a cached device copy
    problem = (f"latent {'x'.join(map(str, args.latent))} + {args.text} text ({args.text_len} valid), tile "
               f"{'x'.join(map(str, args.tile))}, B {B}, {H} heads, D {D}, {args.dtype}, {len(windows)} candidates")
    print(f"bench_calibrate: {problem}, S {S}, on {torch.cuda.get_device_name(device) if cuda else device}",
          flush=True)

    def dense():
        return tilewise.dense_attention(q, k, v, text_len=text_len, **kw)

    def candidate(w):
        return lambda: tilewise.sliding_tile_attention(q, k, v, window=w, text_len=text_len, **kw)

    def bare():
        dense()
        for w in windows:
            candidate(w)()

    result = {}

    def evaluate():
        result["e"] = cal.evaluate(q, k, v, geometry, windows)

    t_eval = timed(evaluate)
    t_bare = timed(bare)
    ratio = t_eval / t_bare

    # Diagnostics: the calls alone, the reduction alone, host syncs in evaluate().
    t_dense = timed(dense)
    t_cands = [timed(candidate(w)) for w in windows]
    ops = _backend.TorchOps() if cuda else None
    t_reduce = None
    if ops is not None:
        ref, out = dense(), candidate(windows[0])()
        t_reduce = timed(lambda: ops.diff_sums(out, ref, "bshd"))
        del ref, out
    syncs = None
    if cuda:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    evaluate()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        except Exception as e:  # an older torch without the debug mode: skip the check
            print(f"(sync check skipped: {e})")

    e = result["e"]
    ok = bool((e.mse > 0).all()) and bool(np.isfinite(e.rel_mse).all())  # sparse differs from dense; no NaN
    print(f"dense {t_dense:.2f} ms; candidates " + ", ".join(
        f"{'x'.join(map(str, w))} {t:.2f} ms" for w, t in zip(windows, t_cands)))
    print(f"sum of the calls timed alone {t_dense + sum(t_cands):.2f} ms"
          + (f"; reduction of one candidate {t_reduce:.2f} ms (x{len(windows)} + energy in evaluate)"
             if t_reduce is not None else ""))
    if syncs is not None:
        print(f"host syncs reported by torch in one evaluate(): {syncs} (expected 1, the final copy)")
    print("mean rel_mse per candidate: " + ", ".join(
        f"{'x'.join(map(str, w))} {m:.3e}" for w, m in zip(windows, e.rel_mse.mean(axis=1))))
    if not ok:
        print("WARNING: unexpected errors (a sparse candidate equal to dense, or NaN)")

    table = (f"| problem | evaluate() ms | {1 + len(windows)} bare calls ms | ratio | goal |\n|---|---|---|---|---|\n"
             f"| {problem} | {t_eval:.1f} | {t_bare:.1f} | {ratio:.3f} | <= {GOAL} "
             f"({'met' if ratio <= GOAL else 'NOT met'}) |")
    print()
    emit(table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
