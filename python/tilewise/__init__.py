"""tilewise: tile-sparse attention for video diffusion transformers.

Functions take q, k, v as arrays of shape [B, S, H, D] (layout="bshd") or [B, H, S, D] (layout="bhsd"), with
S = T*H*W video tokens (+ text positions). numpy arrays run on the CPU backend; torch tensors run on their
device (CUDA tensors on the Hopper kernel) through the custom op torch.ops.tilewise.attention_fwd, which
works under torch.compile and CUDA graphs. torch is optional: it is only loaded when a tensor is passed.

    o = tilewise.sliding_tile_attention(q, k, v, latent=(30, 48, 80), tile=(6, 8, 8), window=(3, 3, 3))

Bad arguments raise ValueError / TypeError naming the argument and the expected value. The diffusers
integration is tilewise.diffusers (enable / disable).
"""
from __future__ import annotations

import sys as _sys

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

from tilewise._version import __version__  # noqa: E402,F401  (the VERSION file)


def clear_plan_cache() -> None:
    """Drops the plans cached by the torch op (a no-op when torch was never used)."""
    from tilewise import _api
    if _api._torch_impl is not None:
        _api._torch_impl.clear_plan_cache()


if _sys.modules.get("torch") is not None:  # register the custom op now, not in the middle of a torch.compile trace
    from tilewise import _api as _api_module

    try:
        _api_module._torch_module()
    except Exception:  # e.g. a torch without torch.library.custom_op (< 2.4): numpy still works; the error
        pass           # comes back when a tensor is passed
