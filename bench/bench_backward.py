#!/usr/bin/env python3
"""Backward benchmark of tilewise against dense and sparse baselines, in one run, one table (the rows of
bench_forward.py).

Columns: tilewise backward median ms (triton do_bench; only Plan::run_backward through _capi, after one forward
for o and lse), its effective TFLOP/s (2.5 x the FLOPs of allowed pairs, FlashAttention's convention for the
backward's five GEMMs), cuDNN SDPA backward (dense; the text padding as a key mask where some text is padding; dense
FLOPs), FlexAttention backward (compiled) with the same block mask as bench_forward builds, the speedups over both,
tilewise's forward + backward ms, and the max-abs differences of tilewise's dq/dk/dv against Flex's (a check that
both ran the same mask on the same dout).

With --also-arrangement N, a column more: the backward in arrangement N (TILEWISE_BACKWARD_FUSED_DQ=N, read when a
plan is made: 0 the two kernels, 2 the reduce kernel, the default at every density since v3.13), timed in the same
run as the default.

--variants NAME=LIB,... as in bench_forward.py: the default library and each variant alternated in this process, a
column each, and each variant's largest gradient difference from the default's in a note (with "@VAR=VALUE" host switches, e.g. --variants clu=@TILEWISE_BACKWARD_CLUSTER=1).

Usage: python3 bench/bench_backward.py [--lib build/libtilewise.so] [--rows 1,2] [--only w3x3x3,partial]
       [--no-flex] [--no-dense] [--deterministic] [--also-arrangement 0] [--variants k96=/tmp/v/k96/libtilewise.so]
       [--variant-repeats 2] [--out table.md]
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_forward import (Row, _tiled_permutation, alternate_variants, bench, block_mask_from_mod,  # noqa: E402
                           compiled_flex, flex_mask_mod, max_abs_diff, parse_args, plan_kwargs, row_inputs,
                           selected_rows, variant_cells, variant_header)
from report import emit  # noqa: E402


class TilewiseRun:
    """One row's tilewise plan and buffers: forward() writes o and lse, backward() dq, dk and dv."""

    def __init__(self, row: Row, q, k, v, dout, text_len, deterministic: bool):
        B, S, Hh, D = q.shape
        self.plan = _capi.Plan(**plan_kwargs(row, B))
        self.q, self.k, self.v, self.dout = q, k, v, dout
        self.o = torch.empty_like(q)
        self.lse = torch.empty(B, Hh, S, device=q.device, dtype=torch.float32)
        self.dq, self.dk, self.dv = (torch.empty_like(x) for x in (q, k, v))
        self.tl_ptr = text_len.data_ptr() if row.text else 0
        size = self.plan.backward_workspace_bytes()
        self.workspace = torch.empty(max(size, 1), device=q.device, dtype=torch.uint8)
        assert self.workspace.data_ptr() % 256 == 0, "torch's allocator gave a workspace not 256-byte aligned"
        self.deterministic = deterministic
        # dlse stays NULL: zero, as for SDPA and Flex
        self.pointers = {name: getattr(self, name).data_ptr()
                         for name in ("q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv")}

    def forward(self) -> None:
        self.plan.run(self.q.data_ptr(), self.k.data_ptr(), self.v.data_ptr(), self.o.data_ptr(), self.lse.data_ptr(),
                      self.tl_ptr, torch.cuda.current_stream().cuda_stream)

    def backward(self) -> None:
        self.plan.run_backward(**self.pointers, text_len=self.tl_ptr, workspace=self.workspace.data_ptr(),
                               deterministic=self.deterministic, stream=torch.cuda.current_stream().cuda_stream)


def cudnn_backward_ms(row: Row, q, k, v, dout, notes: list) -> tuple[float, float]:
    """cuDNN SDPA backward ms and its dense FLOPs (2.5 x 4 B H Sq Sk D). Where some text positions are padding they
    are masked out as keys; if cuDNN refuses the mask, the padding positions are dropped from the sequence instead
    (what a dense caller without mask support would do)."""
    B, S, Hh, D = q.shape
    nv = math.prod(row.latent)
    padding = row.text > row.text_len
    key_valid = None
    if padding:
        text0 = 0 if row.text_position == "first" else nv
        key_valid = torch.ones(S, dtype=torch.bool, device=q.device)
        key_valid[text0 + row.text_len:text0 + row.text] = False

    def run(qs, ks, vs, gs, mask):
        qd, kd, vd = (x.transpose(1, 2).detach().requires_grad_() for x in (qs, ks, vs))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
            g = torch.empty_like(out).copy_(gs.transpose(1, 2))  # out's strides: no layout copy inside the timing
            torch.autograd.grad(out, (qd, kd, vd), g, retain_graph=True)
            return bench(lambda: torch.autograd.grad(out, (qd, kd, vd), g, retain_graph=True))

    if key_valid is not None:
        try:
            ms = run(q, k, v, dout, key_valid[None, None, None, :])
            return ms, 2.5 * 4.0 * B * Hh * S * S * D
        except RuntimeError as e:
            notes.append(f"cudnn: key mask refused ({str(e).splitlines()[0][:50]}); ran without the padding tokens")
            idx = key_valid.nonzero().squeeze(1)
            q, k, v, dout = (x[:, idx] for x in (q, k, v, dout))
            S = idx.numel()
    return run(q, k, v, dout, None), 2.5 * 4.0 * B * Hh * S * S * D


def flex_backward(flex, row: Row, q, k, v, dout, notes: list):
    """FlexAttention backward ms with bench_forward's block mask (tiled order where the tile divides the latent, its
    best case), and its dq, dk, dv mapped back to tilewise's [B, S, H, D] raster layout."""
    B, S, Hh, D = q.shape
    T, H, W = row.latent
    dev = q.device
    tiled = T % row.tile[0] == 0 and H % row.tile[1] == 0 and W % row.tile[2] == 0
    bm = block_mask_from_mod(flex_mask_mod(row, tiled, dev), S, dev)
    perm = _tiled_permutation(row, dev) if tiled else None

    def to_flex(x):  # [B, S, H, D] -> [B, H, S, D], permuted to tiled order, head dim padded to a power of two
        x = x.transpose(1, 2)
        if perm is not None:
            x = x[:, :, perm]
        return F.pad(x, (0, 128 - D)) if D not in (64, 128) else x

    if D not in (64, 128):
        notes.append(f"flex: head dim zero-padded {D} -> 128 (same gradients)")
    qf, kf, vf = (to_flex(x).detach().requires_grad_() for x in (q, k, v))
    out = flex(qf, kf, vf, block_mask=bm, scale=1.0 / math.sqrt(D))
    gf = torch.empty_like(out).copy_(to_flex(dout))  # out's strides: no layout copy inside the timing
    grads = torch.autograd.grad(out, (qf, kf, vf), gf, retain_graph=True)
    ms = bench(lambda: torch.autograd.grad(out, (qf, kf, vf), gf, retain_graph=True))

    def back(g):  # inverse of to_flex
        g = g[..., :D]
        if perm is not None:
            g = torch.empty_like(g).index_copy_(2, perm, g)
        return g.transpose(1, 2)

    return ms, [back(g) for g in grads]


@contextlib.contextmanager
def backward_arrangement(value: str):
    """TILEWISE_BACKWARD_FUSED_DQ=value while plans are made (the backend reads it at plan time), then as before."""
    before = os.environ.get("TILEWISE_BACKWARD_FUSED_DQ")
    os.environ["TILEWISE_BACKWARD_FUSED_DQ"] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ["TILEWISE_BACKWARD_FUSED_DQ"]
        else:
            os.environ["TILEWISE_BACKWARD_FUSED_DQ"] = before


def main() -> None:
    def extra_args(ap):
        ap.add_argument("--deterministic", action="store_true", help="time tilewise's deterministic backward")
        ap.add_argument("--also-arrangement", choices=["0", "2"], default=None,
                        help="also time this backward arrangement (TILEWISE_BACKWARD_FUSED_DQ) in a column")

    args, groups, dev = parse_args(__doc__, "skip the dense cuDNN SDPA baseline", extra_args)

    flex = None if args.no_flex else compiled_flex()
    table = []
    for row in selected_rows(args, groups):
        S = math.prod(row.latent) + row.text
        B, Hh, D = 1, row.heads, row.head_dim
        q, k, v, dout = row_inputs(row, B, S, 4, dev)
        text_len = torch.full((B,), row.text_len, device=dev, dtype=torch.int32)
        tw = TilewiseRun(row, q, k, v, dout, text_len, args.deterministic)
        flops = 2.5 * tw.plan.flops([row.text_len] * B if row.text else None)
        density = tw.plan.density()
        tw.forward()  # o and lse for the backward
        ms_bwd = bench(tw.backward)
        ms_total = bench(lambda: (tw.forward(), tw.backward()))
        ms_other = float("nan")
        if args.also_arrangement is not None:
            with backward_arrangement(args.also_arrangement):
                tw_other = TilewiseRun(row, q, k, v, dout, text_len, args.deterministic)
            tw_other.forward()
            ms_other = bench(tw_other.backward)
            del tw_other

        def measure(name, repeat):
            run = TilewiseRun(row, q, k, v, dout, text_len, args.deterministic)
            run.forward()
            ms = bench(run.backward)
            if repeat == 0 and name != "default":
                run.backward()
                diff = max(max_abs_diff(a, b) for a, b in zip((run.dq, run.dk, run.dv), (tw.dq, tw.dk, tw.dv)))
                row.notes.append(f"variant {name}: max abs gradient difference from the default {diff:.3g}")
            return ms

        variant_ms = alternate_variants(args, measure, row.name)

        ms_cudnn, dense_flops = float("nan"), float("nan")
        if not args.no_dense:
            try:
                ms_cudnn, dense_flops = cudnn_backward_ms(row, q, k, v, dout, row.notes)
            except RuntimeError as e:
                row.notes.append(f"cudnn: {str(e).splitlines()[0][:60]}")
        ms_flex, diffs = float("nan"), None
        if flex is not None:
            try:
                ms_flex, flex_grads = flex_backward(flex, row, q, k, v, dout, row.notes)
                tw.forward()
                tw.backward()
                diffs = [(g.float() - mine.float()).abs().max().item() for g, mine in zip(flex_grads, (tw.dq, tw.dk, tw.dv))]
                del flex_grads
            except Exception as e:  # noqa: BLE001 - report and continue with the other baselines
                row.notes.append(f"flex: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
        table.append((row.name, 1 - density, ms_bwd, flops / ms_bwd / 1e9, ms_cudnn, dense_flops / ms_cudnn / 1e9,
                      ms_flex, ms_total, ms_other, diffs, variant_ms, row.notes))
        print(f"  done: {row.name}: tilewise bwd {ms_bwd:.2f} ms, cudnn {ms_cudnn:.2f} ms, flex {ms_flex:.2f} ms",
              flush=True)
        del tw, q, k, v, dout
        torch.cuda.empty_cache()

    mode = " (deterministic)" if args.deterministic else ""
    header = (f"| row | sparsity | tilewise bwd ms{mode} | eff TFLOP/s | cuDNN bwd ms (dense) | cuDNN TFLOP/s "
              "| Flex bwd ms (same mask) | x cuDNN | x Flex | tilewise fwd+bwd ms | max abs diff vs Flex dq/dk/dv |")
    other = args.also_arrangement is not None
    if other:
        header += f" arrangement {args.also_arrangement} bwd ms |"
    names, cells = variant_header(args)
    header += cells
    lines = [header, "|" + "---|" * (11 + other + len(names))]
    for name, sp, ms, tf, cu, cutf, fx, total, other_ms, diffs, variant_ms, _ in table:
        diff = "/".join(f"{d:.3g}" for d in diffs) if diffs else "-"
        other_cell = f" {other_ms:.2f} |" if other else ""
        other_cell += variant_cells(variant_ms, names)
        lines.append(f"| {name} | {sp:.1%} | {ms:.2f} | {tf:.0f} | {cu:.2f} | {cutf:.0f} | {fx:.2f} | {cu / ms:.2f} "
                     f"| {fx / ms:.2f} | {total:.2f} | {diff} |{other_cell}")
    notes = [f"- {name}: {n}" for name, *_, notes in table for n in notes]
    emit("\n".join(lines + notes), args.out)


if __name__ == "__main__":
    main()
