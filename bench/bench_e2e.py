#!/usr/bin/env python3
"""End-to-end benchmark: one transformer forward of a full-size video DiT (random bf16 weights), with the
model's own attention (diffusers' SDPA dispatch) and with tilewise's sliding tile attention, one table.

Rows: HunyuanVideo (13B) at the 720p token grid 30x48x80 + 256 text positions (226 valid), and Wan 2.1 14B
at 21x45x80 (480p-720p class) if it fits. Columns: seconds per forward (median of --iters), speedup, and
attention's share of the dense forward, estimated as (attention calls per forward) x (one attention call of
the same shape, timed alone with the same backend) / (forward time).

The GPU machine has no network: diffusers comes from local wheels (scripts/install_wheels.sh).

A second row per model runs tilewise together with diffusers' FirstBlockCache (transformer.enable_cache(
FirstBlockCacheConfig(threshold=...))): --cache-steps forwards at descending timesteps inside one cache context,
as a denoising loop makes them; its time is seconds per step (the cache skips the remaining blocks of a step
whose first block's output barely changed), against the same dense forward.

Usage: python3 bench/bench_e2e.py [--lib build/libtilewise.so] [--models hunyuan,wan] [--window 3x3x3]
       [--cache-steps 6] [--cache-threshold 0.05]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(__file__))
from report import emit, rel_l2  # noqa: E402


def timed(fn, iters: int) -> float:
    """Median seconds of `iters` calls after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def random_init(model: torch.nn.Module) -> torch.nn.Module:
    """Materialises a meta-device model on the GPU with small random weights (norm scales at 1)."""
    model = model.to_empty(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for b in model.buffers():  # none are expected in these models; keep them finite if any appear
            if b.is_floating_point():
                b.zero_()
    return model.eval()


def hunyuan(args):
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel().to(torch.bfloat16)  # the 13B config is diffusers' default
    model = random_init(model)
    T, H, W = 30, 48, 80  # token grid; the latent is (T, 2H, 2W) with patch (1, 2, 2)
    g = torch.Generator(device="cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(1, 256, device="cuda", dtype=torch.bool)
    mask[:, :226] = True
    inputs = dict(hidden_states=torch.randn(1, 16, T, 2 * H, 2 * W, generator=g, **bf),
                  timestep=torch.tensor([500], device="cuda"),
                  encoder_hidden_states=torch.randn(1, 256, 4096, generator=g, **bf),
                  encoder_attention_mask=mask,
                  pooled_projections=torch.randn(1, 768, generator=g, **bf),
                  guidance=torch.tensor([6000.0], **bf), return_dict=False)
    layers = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    S = T * H * W + 256
    return "HunyuanVideo 13B, 30x48x80 + 256 text", model, inputs, layers, (S, 24, 128), True


def wan(args):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                      in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                      num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      eps=1e-6).to(torch.bfloat16)
    model = random_init(model)
    T, H, W = 21, 45, 80
    g = torch.Generator(device="cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    inputs = dict(hidden_states=torch.randn(1, 16, T, 2 * H, 2 * W, generator=g, **bf),
                  timestep=torch.tensor([500], device="cuda"),
                  encoder_hidden_states=torch.randn(1, 512, 4096, generator=g, **bf), return_dict=False)
    return "Wan 2.1 14B, 21x45x80", model, inputs, len(model.blocks), (T * H * W, 40, 128), False


def attention_alone(shape, masked: bool, window, iters: int):
    """One dense SDPA call (the model's path: a boolean key mask when the model has text padding) and one
    tilewise call of the same shape."""
    import tilewise

    S, heads, D = shape
    q, k, v = (torch.randn(1, heads, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(1, 1, 1, S, device="cuda", dtype=torch.bool)
        mask[..., S - 30:] = False  # 226 of 256 text keys valid
    dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), iters)
    latent = (30, 48, 80) if masked else (21, 45, 80)
    text_len = torch.tensor([226], device="cuda", dtype=torch.int32) if masked else None
    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))  # [B, S, H, D] views
    sparse = timed(lambda: tilewise.sliding_tile_attention(qs, ks, vs, latent=latent, tile=(6, 8, 8), window=window,
                                                           text_len=text_len), iters)
    return dense, sparse


def with_first_block_cache(model, inputs, steps: int, threshold: float):
    """Seconds per step of `steps` forwards at descending timesteps (one cache context, as a denoising loop
    runs them) with FirstBlockCache on top of whatever attention the model has; and the first step's output
    (which the cache always computes in full). The cache is removed afterwards."""
    from diffusers import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    timesteps = torch.linspace(999, 1, steps, device="cuda").round()
    try:
        def loop():
            outs = []
            with model.cache_context("cond"):
                for t in timesteps:
                    outs.append(model(**dict(inputs, timestep=t.reshape(1).to(inputs["timestep"].dtype)))[0])
            return outs[0]

        first = loop()  # warm-up (and the cache's state is reset by the next context)
        model._reset_stateful_cache()
        total = timed(loop, 1)
    finally:
        model.disable_cache()
    return total / steps, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=None, help="path to libtilewise.so (else TILEWISE_LIBRARY or the package's)")
    ap.add_argument("--models", default="hunyuan,wan")
    ap.add_argument("--window", default="3x3x3")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--cache-steps", type=int, default=6, help="denoising steps of the FirstBlockCache row (0: no row)")
    ap.add_argument("--cache-threshold", type=float, default=0.05)
    args = ap.parse_args()
    if args.lib:
        os.environ["TILEWISE_LIBRARY"] = os.path.abspath(args.lib)
    import diffusers
    import tilewise
    import tilewise.diffusers

    window = tuple(int(x) for x in args.window.split("x"))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  diffusers {diffusers.__version__}",
          flush=True)
    rows = []
    for name in args.models.split(","):
        torch.cuda.empty_cache()
        try:
            title, model, inputs, layers, shape, masked = {"hunyuan": hunyuan, "wan": wan}[name](args)
        except torch.OutOfMemoryError as e:
            print(f"{name}: does not fit ({e})", flush=True)
            continue
        with torch.no_grad():
            dense_out = model(**inputs)[0]
            t_dense = timed(lambda: model(**inputs), args.iters)
            tilewise.diffusers.enable(model, strategy=window)
            sparse_out = model(**inputs)[0]
            t_sparse = timed(lambda: model(**inputs), args.iters)
            t_cached = cached_out = None
            if args.cache_steps > 0:
                t_cached, cached_out = with_first_block_cache(model, inputs, args.cache_steps, args.cache_threshold)
            tilewise.diffusers.disable(model)
        rel = rel_l2(sparse_out, dense_out)
        a_dense, a_sparse = attention_alone(shape, masked, window, 5)
        share = layers * a_dense / t_dense
        rows.append((title, t_dense, t_sparse, t_dense / t_sparse, share, layers * a_dense, layers * a_sparse, rel))
        print(f"{title}: dense {t_dense:.2f} s, tilewise {t_sparse:.2f} s, {t_dense / t_sparse:.2f}x", flush=True)
        if t_cached is not None:
            rel_c = rel_l2(cached_out, dense_out)
            rows.append((f"{title}, + FirstBlockCache (threshold {args.cache_threshold}, s per step over "
                         f"{args.cache_steps} steps)", t_dense, t_cached, t_dense / t_cached, None, None, None, rel_c))
            print(f"{title} + FirstBlockCache: {t_cached:.2f} s per step, {t_dense / t_cached:.2f}x", flush=True)
        del model, inputs, dense_out, sparse_out, cached_out
    header = ("| model | forward, own attention (s) | forward, tilewise w" + args.window +
              " (s) | speedup | attention share of dense forward | attention per forward: dense / tilewise (s) "
              "| rel L2 sparse vs dense output |")
    lines = [header, "|" + "---|" * 7]
    for title, td, ts, sp, share, ad, asp, rel in rows:
        share_text = "-" if share is None else f"{100 * share:.0f}%"
        attn_text = "-" if ad is None else f"{ad:.2f} / {asp:.2f}"
        lines.append(f"| {title} | {td:.2f} | {ts:.2f} | {sp:.2f}x | {share_text} | {attn_text} | {rel:.3f} |")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
