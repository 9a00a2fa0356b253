#!/usr/bin/env python3
"""Forward benchmark of tilewise's Hopper kernel against dense and sparse baselines, in one run, one table.

Columns: median ms (triton do_bench), effective TFLOP/s (FLOPs of allowed pairs only; dense baselines count
all pairs), speedup over cuDNN SDPA (dense), speedup over FlexAttention (compiled) with the same mask, and the
max-abs difference between tilewise's and FlexAttention's outputs (a check that both ran the same mask).
FP8 columns (docs/semantics.md §11; --no-fp8 skips them): precision "fp8" end to end (bf16 in and out, the
pre-pass that quantises q, k and packs V^T included), the kernel alone on inputs quantised beforehand ("fp8_scaled"
on quantize_fp8's tensors), the speedup of the former over tilewise bf16 and over cuDNN, and its error: the
relative L2 distance of its output from tilewise bf16's (whose own error against float64 is ~0.2%, so this is
FP8's error to within a few percent of itself).

FlexAttention gets its best case: when the tile divides the latent the sequence is permuted to tiled order
(so its 128-token blocks are whole sub-tiles); otherwise it runs on raster order with the same mask_mod.

With --variants NAME=LIB,... (libraries from scripts/kernel_variants.py), the default library and each variant are
timed alternately --variant-repeats times per row in this process, a column each ("a / b"), and a note gives each
variant's largest output difference from the default's. A LIB may end in "@VAR=VALUE" settings of the environment,
in force while that variant's plans are made (a host-side switch such as TILEWISE_BACKWARD_CLUSTER=1); an empty LIB
is the default library ("clu=@TILEWISE_BACKWARD_CLUSTER=1"). --variant-precision fp8_scaled times the FP8 kernel instead
(each library on the same inputs, quantised once by the default library), for variants of hopper/fp8/.

Usage: python3 bench/bench_forward.py [--lib build/libtilewise.so] [--rows 1,2] [--only w3x3x3,partial]
       [--no-flex] [--no-dense] [--no-fp8] [--variants m192=/tmp/f8/m192/libtilewise.so] [--variant-repeats 2]
       [--variant-precision bf16|fp8_scaled] [--out table.md]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from report import emit, rel_l2  # noqa: E402


@dataclass
class Row:
    group: int
    name: str
    latent: tuple
    heads: int
    head_dim: int
    tile: tuple
    pattern: str = "sliding_tile"
    window: tuple = (3, 3, 3)
    global_frames: int = 0
    text: int = 0
    text_len: int = 0
    text_position: str = "last"
    layout: str = "bshd"  # the tensors' memory: [B, S, H, D] rows or [B, H, S, D] (each head's sequence contiguous)
    notes: list = field(default_factory=list)


def rows() -> list[Row]:
    r = []
    for win in [(3, 3, 3), (3, 5, 5), (5, 6, 10)]:
        for text, tl in [(0, 0), (256, 226)]:
            r.append(Row(1, f"Hunyuan 30x48x80 w{'x'.join(map(str, win))}" + (" +text" if text else ""),
                         (30, 48, 80), 24, 128, (6, 8, 8), window=win, text=text, text_len=tl))
    # row 1 on [B, H, S, D] tensors (the other rows are [B, S, H, D]): every pass reads and writes other strides
    r.append(Row(1, "Hunyuan 30x48x80 w3x3x3 bhsd", (30, 48, 80), 24, 128, (6, 8, 8), layout="bhsd"))
    r.append(Row(2, "Hunyuan 33x45x80 w3x3x3 (partial)", (33, 45, 80), 24, 128, (6, 8, 8)))
    r.append(Row(3, "Wan2.1-14B 21x45x80 w3x3x3", (21, 45, 80), 40, 128, (6, 8, 8)))
    r.append(Row(4, "OpenSoraPlan 24x45x80 attn-tile g3 D96", (24, 45, 80), 24, 96, (1, 8, 16),
                 pattern="attention_tile", global_frames=3))
    r.append(Row(5, "CogVideoX 13x30x45 w13x3x3 text-first D64", (13, 30, 45), 48, 64, (1, 8, 16),
                 window=(13, 3, 3), text=226, text_len=226, text_position="first"))
    # row 1's geometry and sparsity at head dim 64: the D 64 path's rate against D 128's on the same pattern
    r.append(Row(5, "Hunyuan 30x48x80 w3x3x3 D64", (30, 48, 80), 24, 64, (6, 8, 8)))
    return r


def plan_kwargs(row: Row, batch: int = 1) -> dict:
    """The _capi.Plan arguments of one benchmark row (bf16, one kv head per query head, on the GPU)."""
    return dict(batch=batch, q_heads=row.heads, kv_heads=row.heads, head_dim=row.head_dim, dtype="bf16",
                latent=row.latent, tile=row.tile, text_capacity=row.text, text_position=row.text_position,
                pattern=row.pattern, windows=(row.window,), global_frames=(row.global_frames,), radius=(0,),
                layout=row.layout, device="cuda")


def row_inputs(row: Row, batch: int, seq: int, count: int, device) -> list:
    """`count` random bf16 tensors of shape [B, S, H, D] in the row's memory layout (for [B, H, S, D] rows, views of
    contiguous [B, H, S, D] tensors), so that o and the gradients made by empty_like share it."""
    shape = (batch, row.heads, seq, row.head_dim) if row.layout == "bhsd" else (batch, seq, row.heads, row.head_dim)
    xs = [torch.randn(*shape, device=device, dtype=torch.bfloat16) for _ in range(count)]
    return [x.transpose(1, 2) for x in xs] if row.layout == "bhsd" else xs


def named_libraries(text: str) -> list:
    """"NAME=LIB,..." (an argparse type): [(name, path to libtilewise.so)] of kernel variants. A LIB may end in
    "@VAR=VALUE" settings of the environment, in force while that variant's plans are made (a host-side switch of
    the library such as TILEWISE_BACKWARD_CLUSTER); an empty LIB before them is the default library."""
    return [tuple(v.split("=", 1)) for v in text.split(",") if v]


@contextlib.contextmanager
def variant_environment(path: str, default_lib: str):
    """Loads a --variants entry's library and sets its "@VAR=VALUE" settings (named_libraries) until the end."""
    lib, *settings = path.split("@")
    saved = {}
    for setting in settings:
        var, _, value = setting.partition("=")
        saved[var] = os.environ.get(var)
        os.environ[var] = value
    _capi.lib(lib or default_lib)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def bench(fn, warmup_ms: float = 1000, rep_ms: float = 2000) -> float:
    """Median ms at the card's sustained state. Under this load an H100 SXM sits at its 700 W cap and the clock
    swings between about 1.4 and 1.6 GHz with a period near a second (docs/performance.md, v4), so a short
    window lands on a random phase of that swing: 1 s of warm-up and 2 s of timed runs average over it."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def window_range(c, k, n):
    """Sliding-tile window along one axis (spec: start = clamp(c - k//2, 0, n - k)); torch version for the
    FlexAttention baseline's mask_mod."""
    if k >= n:
        return torch.zeros_like(c), torch.full_like(c, n)
    start = torch.clamp(c - k // 2, 0, n - k)
    return start, start + k


def flex_mask_mod(row: Row, tiled: bool, device):
    T, H, W = row.latent
    tt, th, tw = row.tile
    nt, nh, nw = -(-T // tt), -(-H // th), -(-W // tw)
    nv = T * H * W
    video0 = row.text if row.text_position == "first" else 0
    text0 = 0 if row.text_position == "first" else nv
    vol = tt * th * tw

    def coords(s):
        i = s - video0
        if tiled:
            tile, r = i // vol, i % vol
            ct, ch, cw = tile // (nh * nw), (tile // nw) % nh, tile % nw
            return ct * tt + r // (th * tw), ch * th + (r // tw) % th, cw * tw + r % tw
        return i // (H * W), (i // W) % H, i % W

    def mask_mod(b, h, q, kv):
        q_text = (q >= text0) & (q < text0 + row.text)
        k_text = (kv >= text0) & (kv < text0 + row.text)
        k_text_ok = k_text & (kv - text0 < row.text_len)
        qt, qh, qw = coords(q)
        kt, kh, kw = coords(kv)
        if row.pattern == "sliding_tile":
            ok = torch.ones_like(q, dtype=torch.bool)
            for qc, kc, k, n, t in ((qt, kt, row.window[0], nt, tt), (qh, kh, row.window[1], nh, th),
                                    (qw, kw, row.window[2], nw, tw)):
                s, e = window_range(qc // t, k, n)
                ok = ok & (kc // t >= s) & (kc // t < e)
        else:
            g = row.global_frames
            ok = (qt < g) | (kt < g) | (qt == kt)
        video_pair = ~q_text & ~k_text & ok
        return video_pair | k_text_ok | (q_text & ~k_text)

    return mask_mod


def block_mask_from_mod(mask_mod, S: int, dev, blk: int = 128, chunk: int = 4):
    """FlexAttention BlockMask from a mask_mod, evaluated a few query blocks at a time (create_block_mask can
    materialise S x S intermediates on some patterns). Blocks that are wholly allowed become full blocks;
    blocks with some allowed pairs are partial and keep the mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = -(-S // blk)
    kv = torch.arange(S, device=dev)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    any_ = torch.zeros(nb, nb, dtype=torch.bool, device=dev)
    all_ = torch.zeros(nb, nb, dtype=torch.bool, device=dev)
    for i0 in range(0, nb, chunk):
        i1 = min(i0 + chunk, nb)
        q = torch.arange(i0 * blk, min(i1 * blk, S), device=dev)
        m = torch.zeros((i1 - i0) * blk, nb * blk, dtype=torch.bool, device=dev)
        m[: q.numel(), :S] = mask_mod(zero, zero, q[:, None], kv[None, :])
        v = m.view(i1 - i0, blk, nb, blk)
        any_[i0:i1] = v.any(dim=3).any(dim=1)
        all_[i0:i1] = v.all(dim=3).all(dim=1)  # padding rows/columns are False: tail blocks stay partial
    partial = any_ & ~all_

    def lists(sel):
        num = sel.sum(-1).to(torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # selected first
        return num[None, None], idx[None, None]

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(all_)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, mask_mod=mask_mod, seq_lengths=(S, S))


def parse_args(doc: str, dense_help: str, extra=None) -> tuple:
    """The options every kernel benchmark takes (`extra(parser)` adds its own), then the library loaded, the seed
    fixed and the device printed: (args, row groups, device)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=None, help="path to libtilewise.so")
    ap.add_argument("--rows", default="1,2,3,4,5", help="row groups to run (1..5)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--no-dense", action="store_true", help=dense_help)
    ap.add_argument("--only", default=None, help="run only rows whose name contains one of these ','-separated strings")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--variants", type=named_libraries, default=[],
                    help="NAME=LIB[@VAR=VALUE...],...: kernel variants (and host switches) timed against the default library, alternated in this "
                         "process (a column each)")
    ap.add_argument("--variant-repeats", type=int, default=2, help="alternations of the default and the variants")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    args.default_lib = args.lib or _capi._find_library()
    _capi.lib(args.lib)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    return args, {int(g) for g in args.rows.split(",")}, torch.device("cuda")


def alternate_variants(args, measure, label: str) -> dict:
    """{name: [ms per repeat]} of the default library and each --variants library, alternated --variant-repeats times
    in this process (same clocks, same inputs): measure(name, repeat) makes its plans while that library is loaded
    (each _capi.Plan keeps the library it was made with) and returns ms. Empty without --variants. Each time is also
    printed as it is taken, after the row's name `label`, so that a run cut short by a time limit keeps them."""
    times: dict = {}
    if not args.variants:
        return times
    for repeat in range(args.variant_repeats):
        for name, path in [("default", args.default_lib)] + args.variants:
            with variant_environment(path, args.default_lib):
                times.setdefault(name, []).append(measure(name, repeat))
            print(f"  {label}: {name} (repeat {repeat + 1}) {times[name][-1]:.2f} ms", flush=True)
    _capi.lib(args.default_lib)
    return times


def variant_header(args) -> tuple:
    """(the variant columns' names, their header cells) for alternate_variants' results."""
    names = ["default"] + [name for name, _ in args.variants] if args.variants else []
    return names, "".join(f" {name} ms |" for name in names)


def variant_cells(times: dict, names: list) -> str:
    return "".join(" " + " / ".join(f"{t:.2f}" for t in times[n]) + " |" for n in names)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| (inf where either is NaN)."""
    return (a.float() - b.float()).abs().nan_to_num(nan=float("inf")).max().item()


def compiled_flex():
    """FlexAttention compiled for the benchmark rows."""
    from torch.nn.attention.flex_attention import flex_attention

    # Every row is a new shape and mask: without a higher limit dynamo stops recompiling after 8 and falls back to
    # the unfused eager path, which materialises the scores and runs out of memory.
    torch._dynamo.config.recompile_limit = 64
    return torch.compile(flex_attention, dynamic=False)


def selected_rows(args, groups) -> list:
    """The rows of the chosen groups, narrowed by --only."""
    selected = [r for r in rows() if r.group in groups]
    if args.only:
        selected = [r for r in selected if any(k in r.name for k in args.only.split(","))]
    return selected


def quantized_inputs(plan_fp8, q, k, v, tl_ptr: int) -> tuple:
    """(q8, k8, v8, scale tensors) from quantize_fp8 of a precision "fp8" plan: the inputs of "fp8_scaled" runs."""
    q8, k8, v8 = (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) for x in (q, k, v))
    B, S, H, D = q.shape
    scales = [torch.empty(n, dtype=torch.float32, device=q.device)
              for n in (B * H * S, B * H * plan_fp8.fp8_key_blocks(), B * H * D)]
    plan_fp8.quantize_fp8(q.data_ptr(), k.data_ptr(), v.data_ptr(), tl_ptr,
                          [t.data_ptr() for t in (q8, k8, v8, *scales)], torch.cuda.current_stream().cuda_stream)
    return q8, k8, v8, scales


def run_fp8_scaled(plan, inputs, o, tl_ptr: int) -> None:
    """One "fp8_scaled" run (the FP8 kernel and its V^T pack alone) on quantized_inputs' tensors."""
    q8, k8, v8, scales = inputs
    plan.run(q8.data_ptr(), k8.data_ptr(), v8.data_ptr(), o.data_ptr(), 0, tl_ptr,
             torch.cuda.current_stream().cuda_stream, scales=[t.data_ptr() for t in scales])


def fp8_columns(row: Row, q, k, v, o_bf16, text_len, run_kw: dict) -> tuple:
    """(ms of precision fp8 end to end, ms of the kernel on pre-quantised inputs, rel L2 of fp8's output from
    bf16's) for one row: plans of their own, the same inputs."""
    plans = {prec: _capi.Plan(precision=prec, **run_kw) for prec in ("fp8", "fp8_scaled")}
    o = torch.empty_like(o_bf16)
    tl_ptr = text_len.data_ptr() if row.text else 0
    stream = torch.cuda.current_stream().cuda_stream

    def run_fp8():
        plans["fp8"].run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), 0, tl_ptr, stream)

    ms = bench(run_fp8)
    run_fp8()
    err = rel_l2(o, o_bf16)
    inputs = quantized_inputs(plans["fp8"], q, k, v, tl_ptr)
    ms_kernel = bench(lambda: run_fp8_scaled(plans["fp8_scaled"], inputs, o, tl_ptr))
    del plans
    return ms, ms_kernel, err


def main() -> None:
    def extra(ap):
        ap.add_argument("--no-fp8", action="store_true", help="skip the FP8 columns")
        ap.add_argument("--variant-precision", choices=("bf16", "fp8_scaled"), default="bf16",
                        help="what --variants times: the bf16 kernel, or the FP8 kernel on inputs quantised once")

    args, groups, dev = parse_args(__doc__, "skip the dense SDPA baselines (kernel variant runs)", extra=extra)

    flex = None if args.no_flex else compiled_flex()
    table = []
    for row in selected_rows(args, groups):
        T, H, W = row.latent
        nv = T * H * W
        S = nv + row.text
        B, Hh, D = 1, row.heads, row.head_dim
        q, k, v = row_inputs(row, B, S, 3, dev)
        o = torch.empty_like(q)
        text_len = torch.full((B,), row.text_len, device=dev, dtype=torch.int32)
        run_kw = plan_kwargs(row, B)
        plan = _capi.Plan(**run_kw)
        flops = plan.flops([row.text_len] * B if row.text else None)
        density = plan.density()
        tl_ptr = text_len.data_ptr() if row.text else 0

        def run_tw():
            plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), 0, tl_ptr,
                     torch.cuda.current_stream().cuda_stream)

        ms_tw = bench(run_tw)
        run_tw()
        o_default = o.clone()

        fp8_variants = bool(args.variants) and args.variant_precision == "fp8_scaled"
        if fp8_variants:  # the FP8 kernel's inputs, quantised once by the default library; its output as reference
            # (the plans stay alive until the row's work on the stream is done: they own its workspace)
            default_fp8 = {prec: _capi.Plan(precision=prec, **run_kw) for prec in ("fp8", "fp8_scaled")}
            inputs = quantized_inputs(default_fp8["fp8"], q, k, v, tl_ptr)
            run_fp8_scaled(default_fp8["fp8_scaled"], inputs, o_default, tl_ptr)

        def measure(name, repeat):
            vo = torch.empty_like(o)
            stream = torch.cuda.current_stream().cuda_stream
            if fp8_variants:
                vplan = _capi.Plan(precision="fp8_scaled", **run_kw)

                def vrun():
                    run_fp8_scaled(vplan, inputs, vo, tl_ptr)
            else:
                vplan = _capi.Plan(**run_kw)

                def vrun():
                    vplan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), vo.data_ptr(), 0, tl_ptr, stream)

            ms = bench(vrun)
            if repeat == 0 and name != "default":
                vrun()
                note = (f"variant {name} ({args.variant_precision}): max abs output difference from the "
                        f"default {max_abs_diff(vo, o_default):.3g}")
                if fp8_variants:  # a variant may change the FP8 arithmetic: its error next to the default's
                    note += (f"; rel L2 vs the bf16 output {rel_l2(vo, o):.4f} (the default FP8's "
                             f"{rel_l2(o_default, o):.4f})")
                row.notes.append(note)
            return ms

        variant_ms = alternate_variants(args, measure, row.name)
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] views for SDPA
        dense_flops = 4.0 * B * Hh * S * S * D
        res = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            if args.no_dense:
                res[name] = float("nan")
                continue
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qh, kh, vh)
                    res[name] = bench(lambda: F.scaled_dot_product_attention(qh, kh, vh))
            except RuntimeError as e:  # e.g. head dim not supported by a backend
                res[name] = float("nan")
                row.notes.append(f"{name}: {str(e).splitlines()[0][:60]}")
        ms_flex, diff = float("nan"), float("nan")
        if flex is not None:
            tiled = T % row.tile[0] == 0 and H % row.tile[1] == 0 and W % row.tile[2] == 0
            try:
                bm = block_mask_from_mod(flex_mask_mod(row, tiled, dev), S, dev)
                if tiled:  # permute the video part to tiled order for FlexAttention (its best case)
                    perm = _tiled_permutation(row, dev)
                    qf, kf, vf = (x.transpose(1, 2)[:, :, perm] for x in (q, k, v))
                else:
                    perm, (qf, kf, vf) = None, (qh, kh, vh)
                scale = 1.0 / math.sqrt(D)
                if D not in (64, 128):  # compiled Flex needs a power-of-two head dim: zero-pad, same result
                    pad = 128 - D
                    qf, kf, vf = (F.pad(x, (0, pad)) for x in (qf, kf, vf))
                    row.notes.append(f"flex: head dim zero-padded {D} -> 128 (same output)")
                out_f = flex(qf, kf, vf, block_mask=bm, scale=scale)[..., :D]
                ms_flex = bench(lambda: flex(qf, kf, vf, block_mask=bm, scale=scale))
                run_tw()
                ref = out_f if perm is None else torch.empty_like(out_f).index_copy_(2, perm, out_f)
                diff = (ref.transpose(1, 2).float() - o.float()).abs().max().item()
            except Exception as e:  # noqa: BLE001 - report and continue with the other baselines
                row.notes.append(f"flex: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
        fp8 = (float("nan"),) * 3
        if not args.no_fp8:
            run_tw()
            try:
                fp8 = fp8_columns(row, q, k, v, o, text_len, run_kw)
            except Exception as e:  # noqa: BLE001 - report and keep the row
                row.notes.append(f"fp8: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        table.append((row.name, 1 - density, ms_tw, flops / ms_tw / 1e9, res["cudnn"], dense_flops / res["cudnn"] / 1e9,
                      res["flash"], ms_flex, diff, fp8, flops, variant_ms, row.notes))
        print(f"  done: {row.name}: tilewise {ms_tw:.2f} ms, cudnn {res['cudnn']:.2f} ms, flex {ms_flex:.2f} ms",
              flush=True)
        del q, k, v, o
        torch.cuda.empty_cache()

    header = ("| row | sparsity | tilewise ms | eff TFLOP/s | cuDNN ms (dense) | cuDNN TFLOP/s | flash ms (dense) "
              "| Flex ms (same mask) | x cuDNN | x Flex | max abs diff vs Flex | FP8 ms | FP8 TFLOP/s | FP8 kernel ms "
              "| FP8 x bf16 | FP8 x cuDNN | FP8 rel L2 vs bf16 |")
    names, cells = variant_header(args)
    lines = [header + cells, "|" + "---|" * (17 + len(names))]
    for name, sp, ms, tf, cu, cutf, fl, fx, diff, (f8, f8k, f8err), flops, variant_ms, notes in table:
        lines.append(f"| {name} | {sp:.1%} | {ms:.2f} | {tf:.0f} | {cu:.2f} | {cutf:.0f} | {fl:.2f} | {fx:.2f} "
                     f"| {cu / ms:.2f} | {fx / ms:.2f} | {diff:.3g} | {f8:.2f} | {flops / f8 / 1e9:.0f} | {f8k:.2f} "
                     f"| {ms / f8:.2f} | {cu / f8:.2f} | {f8err:.4f} |{variant_cells(variant_ms, names)}")
    notes = [f"- {name}: {n}" for name, *_, notes in table for n in notes]
    emit("\n".join(lines + notes), args.out)


def _tiled_permutation(row: Row, dev) -> torch.Tensor:
    """perm[i] = raster index of the i-th token in tiled order (text positions map to themselves)."""
    T, H, W = row.latent
    tt, th, tw = row.tile
    t = torch.arange(T, device=dev).view(T // tt, tt, 1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, 1, H // th, th, 1, 1)
    w = torch.arange(W, device=dev).view(1, 1, 1, 1, W // tw, tw)
    raster = (t * H + h) * W + w  # [nt, tt, nh, th, nw, tw]
    video = raster.permute(0, 2, 4, 1, 3, 5).reshape(-1)
    nv = T * H * W
    if row.text_position == "first":
        return torch.cat([torch.arange(row.text, device=dev), video + row.text])
    return torch.cat([video, torch.arange(nv, nv + row.text, device=dev)])


if __name__ == "__main__":
    main()
