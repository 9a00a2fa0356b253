"""tilewise: tile-sparse attention for video diffusion transformers.

Functions take q, k, v as arrays of shape [B, S, H, D] (layout="bshd") or [B, H, S, D] (layout="bhsd"), with
S = T*H*W video tokens (+ text positions). numpy arrays run on the CPU backend; torch tensors run on their
device (CUDA tensors on the Hopper kernel) through the custom op torch.ops.tilewise.attention_fwd, which is
differentiable (torch.ops.tilewise.attention_bwd) and works under torch.compile and CUDA graphs. torch is
optional: it is only loaded when a tensor is passed.

    o = tilewise.sliding_tile_attention(q, k, v, latent=(30, 48, 80), tile=(6, 8, 8), window=(3, 3, 3))

Bad arguments raise ValueError / TypeError naming the argument, the value and what was expected. The diffusers
integration is tilewise.diffusers (enable / disable), the window search tilewise.calibrate, sequence parallelism
over torch.distributed tilewise.parallel (ulysses_attention; imported on its own, it needs torch).
"""
from __future__ import annotations

import sys as _sys

from tilewise._api import (  # noqa: F401
    Plan,
    attention_tile,
    block_sparse_attention,
    dense_attention,
    effective_window,
    fp8_key_blocks,
    quantize_fp8,
    sliding_tile_attention,
    tile,
    tile_grid,
    untile,
)
from tilewise._capi import TilewiseError  # noqa: F401

from tilewise._version import __version__  # noqa: E402,F401  (the VERSION file)


def cuda_available() -> bool:
    """Whether the installed library has a usable Hopper backend: built with CUDA, and an sm_90 GPU present."""
    from tilewise import _capi
    return _capi.cuda_available()


def supports(device: str, dtype: str, head_dim: int, precision: str = "native") -> bool:
    """Whether `device` ("cpu" or "cuda") runs attention in `dtype` ("f32", "f64", "bf16", "f16") at `head_dim`
    and `precision` ("native", "fp8") here, as the library answers it (the CUDA backend: bf16 / f16 at 64, 96, 128
    on sm_90, native and fp8; the CPU: all)."""
    from tilewise import _args, _capi
    precision = _args.choice("precision", precision, _args.PRECISIONS)
    return _capi.device_support(device, dtype, _args.integer("head_dim", head_dim), precision) is None


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
