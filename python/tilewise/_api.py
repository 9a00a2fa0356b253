"""The public functions and tilewise.Plan: argument checking (`_args`), then the numpy front end (`_numpy`, CPU
backend) or the torch front end (`_torch`, loaded when a tensor is first seen; torch stays optional).

Layering: `_capi` (ctypes over the C ABI) <- `_args` (shared argument handling) <- `_numpy`, `_torch` (front
ends) <- `_api` (dispatch on the type of q). Nothing below imports anything above it.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence, Union

from tilewise import _args, _numpy

IntLike = Any       # a Python int, a numpy / torch integer scalar or 0-d integer array
Triple = Sequence[IntLike]
Window = Union[Triple, str]   # (kt, kh, kw) or "KTxKHxKW"
TextLen = Union[None, IntLike, Sequence[IntLike], Any]   # ..., or an integer tensor [B] on q's device
Array = Any         # a numpy array or a torch tensor

_torch_impl = None


def _torch_module():
    global _torch_impl
    if _torch_impl is None:
        from tilewise import _torch
        _torch_impl = _torch
    return _torch_impl


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class Plan:
    """A planned attention for arrays of one geometry: create once, call many times.

        plan = tilewise.Plan(q, k, v, latent=(8, 16, 16), tile=(2, 4, 4), pattern="sliding_tile", window=(3, 3, 3))
        o = plan(q, k, v, text_len=20)

    numpy arrays run on the CPU backend; torch tensors on their device (CPU backend, or the Hopper kernel for
    CUDA tensors, on the current stream at each call, with scratch from the torch allocator: one Plan may run
    on several streams at once). A call on tensors that need gradients goes through the differentiable op.
    """

    def __init__(self, q: Array, k: Array, v: Array, *, latent: Triple, tile: Triple = (6, 8, 8),
                 pattern: str = "sliding_tile", window: Union[Window, Sequence[Window]] = (3, 3, 3),
                 global_frames: Union[IntLike, Sequence[IntLike]] = 1, radius: Union[IntLike, Sequence[IntLike]] = 0,
                 block_offsets: Optional[Sequence[IntLike]] = None, block_tiles: Optional[Sequence[IntLike]] = None,
                 text_position: str = "last", order: str = "raster", layout: str = "bshd",
                 scale: Optional[float] = None, head_offset: IntLike = 0, precision: str = "native",
                 out_dtype=None, sm_margin: IntLike = 0) -> None:
        params = _args.PatternParams.of(pattern, window, global_frames, radius, block_offsets, block_tiles)
        self._torch = _is_torch(q)
        call = _call(self._torch, latent=latent, tile=tile, params=params, text_position=text_position, order=order,
                     layout=layout, scale=scale, head_offset=head_offset, precision=precision, out_dtype=out_dtype,
                     sm_margin=sm_margin)
        front = _torch_module() if self._torch else _numpy
        self._runner = front.Runner(q, k, v, call)

    def __call__(self, q: Array, k: Array, v: Array, *, text_len: TextLen = None, return_lse: bool = False,
                 scales=None):
        """scales: (q_scale, k_scale, v_scale) for e4m3 inputs (precision="fp8", torch.float8_e4m3fn)."""
        if self._torch != _is_torch(q):
            raise TypeError(f"q: expected a {'torch tensor' if self._torch else 'numpy array'} like the ones this "
                            "Plan was made for")
        o, lse = self._runner(q, k, v, text_len, return_lse, scales)
        return (o, lse) if return_lse else o

    def flops(self, text_len: TextLen = None) -> float:
        """FLOPs of the allowed (query, key) pairs, 4 * D per pair; text_len as for a call (None = capacity)."""
        ops = self._runner.operands
        lens = None if text_len is None else list(_args.text_len_values(text_len, ops.batch, ops.text_capacity))
        return self._runner.plan.flops(lens)

    def density(self) -> float:
        """Allowed video-video pairs over all video-video pairs, averaged over heads."""
        return self._runner.plan.density()

    def grid(self) -> tuple:
        """Tiles per axis (from the library)."""
        return self._runner.plan.grid()

    def window(self, head: IntLike) -> tuple:
        """The effective window of local head `head` (sliding tile): each axis clamped to the grid."""
        return self._runner.plan.window(_args.integer("head", head))


def _call(is_torch: bool, *, out_dtype, **kwargs) -> _args.Call:
    """The checked Call of a function or Plan on torch tensors or numpy arrays (out_dtype: a torch dtype or None)."""
    name = _torch_module().out_dtype_name(out_dtype) if is_torch and out_dtype is not None else out_dtype
    return _args.Call.of(out_dtype=name, **kwargs)


def _attention(q, k, v, *, params: _args.PatternParams, latent, tile, text_len, text_position, order, layout, scale,
               head_offset, return_lse, deterministic, precision="native", scales=None, out_dtype=None, sm_margin=0):
    is_torch = _is_torch(q)
    call = _call(is_torch, latent=latent, tile=tile, params=params, text_position=text_position, order=order,
                 layout=layout, scale=scale, head_offset=head_offset, precision=precision, out_dtype=out_dtype,
                 sm_margin=sm_margin)
    if is_torch:
        return _torch_module().attention(q, k, v, call, text_len, bool(return_lse), deterministic, scales)
    _numpy.refuse_scales(scales)
    o, lse = _numpy.Runner(q, k, v, call)(q, k, v, text_len, bool(return_lse))
    return (o, lse) if return_lse else o


def sliding_tile_attention(q: Array, k: Array, v: Array, *, latent: Triple, tile: Triple = (6, 8, 8),
                           window: Union[Window, Sequence[Window]], text_len: TextLen = None,
                           text_position: str = "last", order: str = "raster", layout: str = "bshd",
                           scale: Optional[float] = None, head_offset: IntLike = 0, return_lse: bool = False,
                           deterministic: Optional[bool] = None, precision: str = "native", scales=None,
                           out_dtype=None, sm_margin: IntLike = 0):
    """Sliding Tile Attention: each query tile sees a window of (kt, kh, kw) key tiles (one window for all
    heads, or one per head; "3x3x3" spells (3, 3, 3)), plus every valid text key.

    q, k, v: numpy arrays (CPU backend) or torch tensors (CPU backend, or the Hopper kernel for CUDA tensors,
    through the custom op torch.ops.tilewise.attention_fwd, differentiable). text_len: None (all text valid), an
    int, one int per batch element, or (torch) an integer tensor [B] on q's device. order: "raster" or "tiled"
    (tokens already in tile order, see tile()). head_offset: global index of the first local head (sequence
    parallelism; per-head windows are then indexed by global head). deterministic (torch): a bitwise
    reproducible backward (None = torch.are_deterministic_algorithms_enabled()). precision: "native" (compute in
    q's dtype) or "fp8" (docs/semantics.md §11: e4m3 Q, K, P, V, forward only; the CPU backend so far). With
    precision="fp8", q, k, v may also be torch.float8_e4m3fn tensors quantised by the caller, with scales=(q_scale,
    k_scale, v_scale) (float32 [B, Hq, S], [B, Hkv, key blocks], [B, Hkv, D]; tilewise.quantize_fp8 makes them)
    and the output in out_dtype (default torch.bfloat16). sm_margin: SMs the CUDA kernels leave free for work beside
    them, such as NCCL's all-to-alls under sequence parallelism (FlashAttention-3's sm_margin); the results do not
    change, the CPU ignores it, and a margin of all the device's SMs still runs on one. Returns o shaped like q
    (contiguous in `layout`), and with return_lse=True also the float32 LSE [B, Hq, S]."""
    return _attention(q, k, v, params=_args.PatternParams.of("sliding_tile", window=window), latent=latent, tile=tile,
                      text_len=text_len, text_position=text_position, order=order, layout=layout, scale=scale,
                      head_offset=head_offset, return_lse=return_lse, deterministic=deterministic,
                      precision=precision, scales=scales, out_dtype=out_dtype, sm_margin=sm_margin)


def attention_tile(q: Array, k: Array, v: Array, *, latent: Triple, tile: Triple = (1, 8, 8),
                   global_frames: Union[IntLike, Sequence[IntLike]], radius: Union[IntLike, Sequence[IntLike]] = 0,
                   text_len: TextLen = None, text_position: str = "last", order: str = "raster", layout: str = "bshd",
                   scale: Optional[float] = None, head_offset: IntLike = 0, return_lse: bool = False,
                   deterministic: Optional[bool] = None, precision: str = "native", scales=None, out_dtype=None,
                   sm_margin: IntLike = 0):
    """Efficient-vDiT's frame pattern: frames < global_frames see and are seen by everything; other frames
    see frames within `radius` of their own. Per-head values may be given as sequences. Other arguments as for
    sliding_tile_attention."""
    return _attention(q, k, v, params=_args.PatternParams.of("attention_tile", global_frames=global_frames,
                                                             radius=radius),
                      latent=latent, tile=tile, text_len=text_len, text_position=text_position, order=order,
                      layout=layout, scale=scale, head_offset=head_offset, return_lse=return_lse,
                      deterministic=deterministic, precision=precision, scales=scales, out_dtype=out_dtype,
                      sm_margin=sm_margin)


def block_sparse_attention(q: Array, k: Array, v: Array, *, latent: Triple, tile: Triple,
                           block_offsets: Sequence[IntLike], block_tiles: Sequence[IntLike], text_len: TextLen = None,
                           text_position: str = "last", order: str = "raster", layout: str = "bshd",
                           scale: Optional[float] = None, head_offset: IntLike = 0, return_lse: bool = False,
                           deterministic: Optional[bool] = None, precision: str = "native", scales=None,
                           out_dtype=None, sm_margin: IntLike = 0):
    """Explicit key tiles per (head, query tile), CSR: tiles of query tile t of head h are
    block_tiles[block_offsets[h * num_tiles + t] : block_offsets[h * num_tiles + t + 1]], ascending."""
    return _attention(q, k, v, params=_args.PatternParams.of("block_list", block_offsets=block_offsets,
                                                             block_tiles=block_tiles),
                      latent=latent, tile=tile, text_len=text_len, text_position=text_position, order=order,
                      layout=layout, scale=scale, head_offset=head_offset, return_lse=return_lse,
                      deterministic=deterministic, precision=precision, scales=scales, out_dtype=out_dtype,
                      sm_margin=sm_margin)


def dense_attention(q: Array, k: Array, v: Array, *, latent: Triple, tile: Triple = (6, 8, 8),
                    text_len: TextLen = None, text_position: str = "last", order: str = "raster",
                    layout: str = "bshd", scale: Optional[float] = None, head_offset: IntLike = 0,
                    return_lse: bool = False, deterministic: Optional[bool] = None, precision: str = "native",
                    scales=None, out_dtype=None, sm_margin: IntLike = 0):
    """Full attention over the video plus the valid text keys (the dense reference of the same problem)."""
    return _attention(q, k, v, params=_args.PatternParams.of("dense"), latent=latent, tile=tile, text_len=text_len,
                      text_position=text_position, order=order, layout=layout, scale=scale, head_offset=head_offset,
                      return_lse=return_lse, deterministic=deterministic, precision=precision, scales=scales,
                      out_dtype=out_dtype, sm_margin=sm_margin)


def quantize_fp8(q: Array, k: Array, v: Array, *, latent: Triple, tile: Triple = (6, 8, 8), text_len: TextLen = None,
                 text_position: str = "last", order: str = "raster", layout: str = "bshd"):
    """precision="fp8"'s quantisation alone (docs/semantics.md §11.2), exactly as an fp8 call does it: Q per row,
    K smoothed (its mean over the video and valid text keys subtracted) per key block, V per channel. torch
    tensors on the CPU or on CUDA (there the quantisation runs on the GPU; the FP8 attention is CPU only so far).
    Returns (q8, k8, v8, (q_scale, k_scale, v_scale)): torch.float8_e4m3fn tensors with q's, k's and v's strides,
    and float32 scales, ready for precision="fp8", scales=... on the same geometry (whose LSE then lacks the
    smoothing term)."""
    if not _is_torch(q):
        raise TypeError(f"q: expected a torch tensor, got {type(q).__name__} (numpy has no e4m3 dtype)")
    call = _args.Call.of(latent=latent, tile=tile, params=_args.PatternParams.of("dense"), text_position=text_position,
                         order=order, layout=layout, precision="fp8")
    return _torch_module().quantize_fp8(q, k, v, call, text_len)


def fp8_key_blocks(*, latent: Triple, tile: Triple, text_capacity: IntLike = 0, text_position: str = "last",
                   order: str = "raster"):
    """The K quantisation block of every position of the joint sequence (docs/semantics.md §11.2): its tile's index
    for a video token, num_tiles + text index // 128 for a text position. A list of S ints; max + 1 is the length
    of k_scale's last dimension. From the library."""
    from tilewise import _capi
    plan = _capi.Plan(batch=1, q_heads=1, kv_heads=1, head_dim=1, dtype="f32", latent=_args.triple("latent", latent),
                      tile=_args.triple("tile", tile), text_capacity=_args.integer("text_capacity", text_capacity),
                      text_position=_args.choice("text_position", text_position, _capi.TEXT_POSITIONS),
                      order=_args.choice("order", order, _capi.ORDERS), pattern="dense", device="cpu")
    return plan.fp8_key_block_of_positions()


def _reorder(x, latent, tile, text_position, to_tiled: bool):
    front = _torch_module() if _is_torch(x) else _numpy
    return front.reorder(x, latent, tile, text_position, to_tiled)


def tile(x: Array, *, latent: Triple, tile: Triple, text_position: str = "last") -> Array:
    """Raster -> tiled order of the video tokens of a [B, S, H, D] array or tensor (text copied through).
    numpy arrays must be contiguous; torch tensors may be any [B, S, ...] tensor on any device."""
    return _reorder(x, latent, tile, text_position, True)


def untile(x: Array, *, latent: Triple, tile: Triple, text_position: str = "last") -> Array:
    """Tiled -> raster order; the inverse of tile()."""
    return _reorder(x, latent, tile, text_position, False)


def tile_grid(latent: Triple, tile: Triple) -> tuple:
    """Tiles per axis of a latent grid under a tile, ceil(latent / tile) (from the library)."""
    from tilewise import _capi
    return _capi.tile_grid(_args.triple("latent", latent), _args.triple("tile", tile))


def effective_window(window: Window, *, latent: Triple, tile: Triple) -> tuple:
    """A sliding-tile window as it acts on the grid of latent / tile: each axis clamped to the tiles there are
    (a window at least as large as an axis covers it whole). From the library."""
    from tilewise import _capi
    return _capi.effective_window(_args.triple("latent", latent), _args.triple("tile", tile),
                                  _args.window("window", window))
