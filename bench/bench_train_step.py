#!/usr/bin/env python3
"""Training-step benchmark: one step (forward, backward, AdamW) of a HunyuanVideo-width transformer at 720p
with tilewise's sliding tile attention against the model's own attention (diffusers' SDPA dispatch, pinned to
cuDNN), random weights. A guard stops the run if any attention call fell back to the model's own (its first H200
run found such a fallback under autocast, since fixed); measured: docs/bench/h200-train-v1.md.

Model: HunyuanVideoTransformer3DModel at the 13B model's width (24 heads x 128 = 3072, text_embed_dim 4096),
--dual dual-stream and --single single-stream blocks (as many as fit: the full model's 20 + 40 do not with
AdamW), gradient checkpointing on every block, fp32 master weights and bf16 autocast (what tilewise.train does).
Input: latent 16 x 30 x 96 x 160 (30 x 48 x 80 tokens after the 1x2x2 patch) and 256 text positions (226 valid).
Columns: ms per step (median of --iters after --warmup steps), speedup of tilewise over cuDNN. The goal of the
issue is >= 2.5x per step.

Usage: python3 bench/bench_train_step.py [--lib build/libtilewise.so] [--window 3x3x3] [--dual 2] [--single 8]
       [--iters 5] [--warmup 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(__file__))
from report import emit  # noqa: E402

LATENT = (30, 48, 80)   # tokens after the 1x2x2 patch: HunyuanVideo 720p, 129 frames
TEXT, TEXT_VALID = 256, 226


def build(dual: int, single: int):
    import torch
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: a CPU init of ~2B parameters takes a minute
        model = HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=dual,
            num_single_layers=single, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=4096,
            pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))
    model.enable_gradient_checkpointing()
    return model.train()


def inputs(device):
    import torch

    T, H, W = LATENT
    mask = torch.zeros(1, TEXT, dtype=torch.long, device=device)
    mask[:, :TEXT_VALID] = 1
    return dict(hidden_states=torch.randn(1, 16, T, 2 * H, 2 * W, device=device),
                timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=torch.randn(1, TEXT, 4096, device=device), encoder_attention_mask=mask,
                pooled_projections=torch.randn(1, 768, device=device),
                guidance=torch.tensor([6000.0], device=device))


def step_time(model, batch, iters: int, warmup: int, attention_context) -> float:
    """Median ms of one optimizer step (CUDA events around forward + backward + AdamW)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    target = torch.randn_like(batch["hidden_states"])
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with attention_context(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**batch, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help="libtilewise.so (sets TILEWISE_LIBRARY)")
    ap.add_argument("--window", default="3x3x3")
    ap.add_argument("--dual", type=int, default=2)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args()
    if args.lib:
        os.environ["TILEWISE_LIBRARY"] = args.lib
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import tilewise.diffusers as twd

    if not torch.cuda.is_available():
        print("bench_train_step: needs a CUDA GPU (Hopper for tilewise)", file=sys.stderr)
        return 2
    window = tuple(int(x) for x in args.window.split("x"))
    model = build(args.dual, args.single)
    batch = inputs("cuda")
    params = sum(p.numel() for p in model.parameters())
    # The model's own attention pinned to cuDNN; should this torch's cuDNN path refuse the model's [B,1,1,N] text
    # mask, SDPA's own choice among its kernels, named in the table.
    dense_name = "cuDNN (SDPA, dense)"
    try:
        dense = step_time(model, batch, args.iters, args.warmup, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION))
    except RuntimeError as e:
        print(f"bench_train_step: cuDNN refused ({str(e).splitlines()[0]}); SDPA's own dispatch instead",
              file=sys.stderr)
        dense_name = "SDPA default dispatch (dense; cuDNN refused)"
        dense = step_time(model, batch, args.iters, args.warmup, contextlib.nullcontext)
    ctrl = twd.enable(model, strategy=window)
    sparse = step_time(model, batch, args.iters, args.warmup, contextlib.nullcontext)
    if ctrl.calls["tilewise"] == 0:  # a silent fallback to dense would make the comparison meaningless
        print(f"bench_train_step: no attention call ran on tilewise ({ctrl.calls})", file=sys.stderr)
        return 1
    emit(f"HunyuanVideo width, {args.dual} dual + {args.single} single blocks ({params / 1e9:.2f}B parameters), "
         f"latent {'x'.join(map(str, LATENT))} + {TEXT} text, bf16 autocast, gradient checkpointing, AdamW\n\n"
         "| attention | ms / step | speedup |\n|---|---|---|\n"
         f"| {dense_name} | {dense:.1f} | 1.00x |\n"
         f"| tilewise STA {args.window} | {sparse:.1f} | {dense / sparse:.2f}x |", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
