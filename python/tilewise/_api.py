"""Array-level API: argument checking, geometry from array shapes and strides, and plan/run through the C ABI.

Only numpy arrays (CPU backend) are handled here for now; the PyTorch custom op will reuse `_Geometry` and
`Plan` with tensors' data pointers and the CUDA backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tilewise import _capi

_NUMPY_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", np.dtype(np.float16): "f16"}


def _triple(name: str, value) -> tuple[int, int, int]:
    try:
        t = tuple(int(x) for x in value)
    except TypeError:
        raise TypeError(f"{name}: expected three integers (t, h, w), got {value!r}") from None
    if len(t) != 3:
        raise ValueError(f"invalid {name} = {value!r}: expected three integers (t, h, w)")
    return t


@dataclass(frozen=True)
class _Geometry:
    """What a call's arrays imply: sizes, dtype, element strides and the text capacity."""

    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    text_capacity: int
    strides: dict

    @staticmethod
    def of(q, k, v, latent, layout: str) -> "_Geometry":
        if layout not in ("bshd", "bhsd"):
            raise ValueError(f"invalid layout = {layout!r}: expected 'bshd' ([B, S, H, D]) or 'bhsd' ([B, H, S, D])")
        for name, a in (("q", q), ("k", k), ("v", v)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
            if a.ndim != 4:
                raise ValueError(f"invalid {name}.ndim = {a.ndim}: expected 4 ({layout} = "
                                 f"{'[B, S, H, D]' if layout == 'bshd' else '[B, H, S, D]'})")
            if a.dtype != q.dtype:
                raise TypeError(f"{name}: dtype {a.dtype} differs from q's {q.dtype}")
        if q.dtype not in _NUMPY_DTYPES:
            raise TypeError(f"q: dtype {q.dtype} is not supported: expected float32, float64 or float16")

        def bshd(a):  # (B, S, H, D) sizes and element strides of either layout
            sizes, st = a.shape, [s // a.itemsize for s in a.strides]
            if layout == "bhsd":
                sizes, st = (sizes[0], sizes[2], sizes[1], sizes[3]), (st[0], st[2], st[1], st[3])
            return tuple(sizes), tuple(st)

        (B, S, Hq, D), sq = bshd(q)
        (Bk, Sk, Hk, Dk), sk = bshd(k)
        (Bv, Sv, Hv, Dv), sv = bshd(v)
        if (Bk, Sk, Dk) != (B, S, D) or (Bv, Sv, Hv, Dv) != (Bk, Sk, Hk, Dk):
            raise ValueError(f"invalid k/v shapes {k.shape}, {v.shape}: expected batch {B}, sequence {S} and "
                             f"head dim {D} like q {q.shape}, and k and v alike")
        n_video = int(np.prod(latent))
        if n_video > S:
            raise ValueError(f"invalid latent = {tuple(latent)}: T*H*W = {n_video} exceeds the sequence length "
                             f"S = {S} of q")
        return _Geometry(B, S, Hq, Hk, D, _NUMPY_DTYPES[q.dtype], S - n_video, {"q": sq, "k": sk, "v": sv})


class Plan:
    """A planned attention for arrays of one geometry: create once, call many times.

        plan = tilewise.Plan(q, k, v, latent=(8, 16, 16), tile=(2, 4, 4), pattern="sliding_tile", window=(3, 3, 3))
        o = plan(q, k, v, text_len=20)
    """

    def __init__(self, q, k, v, *, latent, tile=(6, 8, 8), pattern="sliding_tile", window=(3, 3, 3),
                 global_frames=1, radius=0, block_offsets=None, block_tiles=None, text_position="last",
                 layout="bshd", scale=None):
        latent, tile = _triple("latent", latent), _triple("tile", tile)
        g = _Geometry.of(q, k, v, latent, layout)
        windows = [_triple("window", w) for w in window] if _is_per_head(window) else [_triple("window", window)]
        gf = [int(x) for x in np.atleast_1d(global_frames)]
        rr = [int(x) for x in np.atleast_1d(radius)]
        if len(rr) == 1 and len(gf) > 1:
            rr = rr * len(gf)
        self._geometry, self._layout = g, layout
        strides = dict(g.strides, o=_contiguous_strides(g, layout))
        self._plan = _capi.Plan(batch=g.batch, q_heads=g.q_heads, kv_heads=g.kv_heads, head_dim=g.head_dim,
                                dtype=g.dtype, latent=latent, tile=tile, text_capacity=g.text_capacity,
                                text_position=text_position, layout=layout,
                                strides=strides, scale=scale or 0.0,
                                pattern=pattern, windows=windows, global_frames=gf, radius=rr,
                                block_offsets=block_offsets, block_tiles=block_tiles, device="cpu")

    def __call__(self, q, k, v, *, text_len=None, return_lse=False):
        g = _Geometry.of(q, k, v, (0, 0, 0), self._layout)
        if g.strides != self._geometry.strides or (g.batch, g.seq, g.q_heads, g.kv_heads, g.head_dim, g.dtype) != (
                self._geometry.batch, self._geometry.seq, self._geometry.q_heads, self._geometry.kv_heads,
                self._geometry.head_dim, self._geometry.dtype):
            raise ValueError("q/k/v: shapes, strides or dtype differ from the ones this Plan was made for")
        o = np.empty(q.shape, dtype=q.dtype)  # contiguous in the plan's layout
        lse = np.empty((g.batch, g.q_heads, g.seq), dtype=np.float32) if return_lse else None
        lens = _text_len(text_len, g.batch)
        self._plan.run(q.ctypes.data, k.ctypes.data, v.ctypes.data, o.ctypes.data,
                       lse.ctypes.data if lse is not None else 0, lens.ctypes.data if lens is not None else 0)
        return (o, lse) if return_lse else o

    def flops(self, text_len=None) -> float:
        lens = _text_len(text_len, self._geometry.batch)
        return self._plan.flops(None if lens is None else lens.tolist())

    def density(self) -> float:
        return self._plan.density()


def _is_per_head(window) -> bool:
    return len(window) > 0 and not np.isscalar(window[0])


def _contiguous_strides(g: _Geometry, layout: str):
    H, S, D = g.q_heads, g.seq, g.head_dim
    return (S * H * D, H * D, D, 1) if layout == "bshd" else (H * S * D, D, S * D, 1)


def _text_len(text_len, batch: int):
    if text_len is None:
        return None
    arr = np.array([text_len] * batch if np.isscalar(text_len) else text_len, dtype=np.int64)
    if arr.shape != (batch,):
        raise ValueError(f"invalid text_len with shape {arr.shape}: expected an int or {batch} values (one per "
                         "batch element)")
    return arr.astype(np.int32)


def sliding_tile_attention(q, k, v, *, latent, tile=(6, 8, 8), window, text_len=None, text_position="last",
                           layout="bshd", scale=None, return_lse=False):
    """Sliding Tile Attention: each query tile sees a window of (kt, kh, kw) key tiles (one window for all
    heads, or a list with one per head), plus every valid text key."""
    plan = Plan(q, k, v, latent=latent, tile=tile, pattern="sliding_tile", window=window,
                text_position=text_position, layout=layout, scale=scale)
    return plan(q, k, v, text_len=text_len, return_lse=return_lse)


def attention_tile(q, k, v, *, latent, tile=(1, 8, 8), global_frames, radius=0, text_len=None,
                   text_position="last", layout="bshd", scale=None, return_lse=False):
    """Efficient-vDiT's frame pattern: frames < global_frames see and are seen by everything; other frames
    see frames within `radius` of their own. Per-head values may be given as sequences."""
    plan = Plan(q, k, v, latent=latent, tile=tile, pattern="attention_tile", global_frames=global_frames,
                radius=radius, text_position=text_position, layout=layout, scale=scale)
    return plan(q, k, v, text_len=text_len, return_lse=return_lse)


def block_sparse_attention(q, k, v, *, latent, tile, block_offsets: Sequence[int], block_tiles: Sequence[int],
                           text_len=None, text_position="last", layout="bshd", scale=None, return_lse=False):
    """Explicit key tiles per (head, query tile), CSR: tiles of query tile t of head h are
    block_tiles[block_offsets[h * num_tiles + t] : block_offsets[h * num_tiles + t + 1]], ascending."""
    plan = Plan(q, k, v, latent=latent, tile=tile, pattern="block_list", block_offsets=list(block_offsets),
                block_tiles=list(block_tiles), text_position=text_position, layout=layout, scale=scale)
    return plan(q, k, v, text_len=text_len, return_lse=return_lse)


def dense_attention(q, k, v, *, latent, tile=(6, 8, 8), text_len=None, text_position="last", layout="bshd",
                    scale=None, return_lse=False):
    """Full attention over the video plus the valid text keys (the dense reference of the same problem)."""
    plan = Plan(q, k, v, latent=latent, tile=tile, pattern="dense", text_position=text_position, layout=layout,
                scale=scale)
    return plan(q, k, v, text_len=text_len, return_lse=return_lse)


def _reorder(x, latent, tile, text_position, to_tiled: bool):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 4 or not x.flags.c_contiguous:
        raise ValueError(f"invalid x with shape {x.shape}: expected a contiguous [B, S, H, D] array")
    if x.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported: expected float32, float64 or float16")
    latent, tile = _triple("latent", latent), _triple("tile", tile)
    B, S, H, D = x.shape
    text = S - int(np.prod(latent))
    if text < 0:
        raise ValueError(f"invalid latent = {latent}: T*H*W exceeds the sequence length S = {S} of x")
    problem = _capi.make_problem(batch=B, q_heads=H, kv_heads=H, head_dim=D, dtype=_NUMPY_DTYPES[x.dtype],
                                 latent=latent, tile=tile, text_capacity=text, text_position=text_position)
    out = np.empty_like(x)
    _capi.reorder(problem, x.ctypes.data, out.ctypes.data, to_tiled)
    return out


def tile(x, *, latent, tile, text_position="last"):
    """Raster -> tiled order of the video tokens of a contiguous [B, S, H, D] array (text copied through)."""
    return _reorder(x, latent, tile, text_position, True)


def untile(x, *, latent, tile, text_position="last"):
    """Tiled -> raster order; the inverse of tile()."""
    return _reorder(x, latent, tile, text_position, False)
