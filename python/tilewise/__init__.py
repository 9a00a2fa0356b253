"""tilewise: tile-sparse attention for video diffusion transformers.

Functions take q, k, v as arrays of shape [B, S, H, D] (layout="bshd") or [B, H, S, D] (layout="bhsd"), with
S = T*H*W video tokens (+ text positions). numpy arrays run on the CPU backend; the PyTorch op (CUDA tensors
on the Hopper kernel) builds on the same argument handling.

    o = tilewise.sliding_tile_attention(q, k, v, latent=(30, 48, 80), tile=(6, 8, 8), window=(3, 3, 3))

Bad arguments raise ValueError / TypeError naming the argument and the expected value.
"""
from __future__ import annotations

from tilewise._api import (  # noqa: F401
    Plan,
    attention_tile,
    block_sparse_attention,
    dense_attention,
    sliding_tile_attention,
    tile,
    untile,
)
from tilewise._capi import TilewiseError  # noqa: F401

__version__ = "0.1.0"
