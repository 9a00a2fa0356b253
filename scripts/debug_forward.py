#!/usr/bin/env python3
"""Diagnosis of the Hopper kernel on structured inputs, against PyTorch SDPA on problems with one tile (where
tile-sparse attention is plain dense attention). Prints one line per probe: max abs error and a hint."""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tilewise import _capi  # noqa: E402

_capi.lib(sys.argv[1] if len(sys.argv) > 1 else None)
dev = "cuda"


def run(latent, tile, heads, D, q, k, v, text=0, text_len=None):
    plan = _capi.Plan(batch=q.shape[0], q_heads=heads, kv_heads=k.shape[2], head_dim=D, dtype="bf16", latent=latent,
                      tile=tile, text_capacity=text, pattern="dense", device="cuda")
    o = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[0], heads, q.shape[1]), float("nan"), device=dev)
    tl = torch.tensor(text_len, device=dev, dtype=torch.int32) if text_len is not None else None
    plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), tl.data_ptr() if tl is not None else 0)
    torch.cuda.synchronize()
    return o, lse


def probe(name, latent, tile, D, make):
    S = latent[0] * latent[1] * latent[2]
    q, k, v = make(S, D)
    o, lse = run(latent, tile, 1, D, q, k, v)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v))).transpose(1, 2)
    err = (o.float() - ref).abs()
    bad_rows = (err.amax(dim=(2, 3)) > 0.05).nonzero()[:, 1].tolist()
    print(f"{name:40s} max err {err.max().item():.4f} nan {o.isnan().sum().item()} bad rows {len(bad_rows)} "
          f"first {bad_rows[:8]}  o[0,0,0,:4] {o[0, 0, 0, :4].tolist()} ref {ref[0, 0, 0, :4].tolist()}")


r = lambda S, D: torch.randn(1, S, 1, D, device=dev, dtype=torch.bfloat16)
for D in (128, 64):
    probe(f"D{D} V=1", (2, 8, 8), (2, 8, 8), D, lambda S, D: (r(S, D), r(S, D), torch.ones(1, S, 1, D, device=dev, dtype=torch.bfloat16)))
    probe(f"D{D} K=0 (uniform), V=row index", (2, 8, 8), (2, 8, 8), D,
          lambda S, D: (r(S, D), torch.zeros(1, S, 1, D, device=dev, dtype=torch.bfloat16),
                        torch.arange(S, device=dev, dtype=torch.bfloat16).view(1, S, 1, 1).expand(1, S, 1, D).contiguous() / S))
    probe(f"D{D} K=0, V=column index", (2, 8, 8), (2, 8, 8), D,
          lambda S, D: (r(S, D), torch.zeros(1, S, 1, D, device=dev, dtype=torch.bfloat16),
                        (torch.arange(D, device=dev, dtype=torch.bfloat16) / D).view(1, 1, 1, D).expand(1, S, 1, D).contiguous()))
    probe(f"D{D} random 1 tile", (2, 8, 8), (2, 8, 8), D, lambda S, D: (r(S, D), r(S, D), r(S, D)))
    probe(f"D{D} random 2 blocks", (4, 8, 8), (4, 8, 8), D, lambda S, D: (r(S, D), r(S, D), r(S, D)))
    probe(f"D{D} random 6 blocks", (12, 8, 8), (12, 8, 8), D, lambda S, D: (r(S, D), r(S, D), r(S, D)))
