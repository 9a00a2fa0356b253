"""Array-level API: argument checking, geometry from array shapes and strides, and plan/run through the C ABI.

numpy arrays run here on the CPU backend. torch tensors are recognised without importing torch (torch stays
optional) and handed to `tilewise._torch`, which shares this module's argument handling: `_View` (what an
array is: shape, element strides, dtype), `_Geometry` (what three views imply), `_pattern_params` and
`_text_len_values`. Only shapes and types are checked here; the geometry (tiles, windows, masks) lives in the
C++ core, which validates the rest when a plan is created.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Sequence

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


def _volume(t) -> int:
    return int(t[0]) * int(t[1]) * int(t[2])


class _View(NamedTuple):
    """One array as the core sees it: logical shape, strides in elements, and dtype.

    `dtype` is the tilewise name ("f32", "f64", "f16", "bf16") or None when the framework's dtype is not
    supported; `dtype_name` is the framework's own name, for messages."""

    shape: tuple
    strides: tuple
    dtype: str | None
    dtype_name: str

    @staticmethod
    def numpy(a: np.ndarray) -> "_View":
        strides = tuple(s // a.itemsize for s in a.strides)
        if any(s % a.itemsize for s in a.strides):
            strides = None  # not a whole number of elements: rejected by _Geometry.of
        return _View(tuple(a.shape), strides, _NUMPY_DTYPES.get(a.dtype), str(a.dtype))


def _layout_shape(layout: str) -> str:
    return "[B, S, H, D]" if layout == "bshd" else "[B, H, S, D]"


def _check_layout(layout) -> None:
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"invalid layout = {layout!r}: expected 'bshd' ([B, S, H, D]) or 'bhsd' ([B, H, S, D])")


class _Geometry(NamedTuple):
    """What a call's arrays imply: sizes, dtype, element strides (batch, seq, head, dim) and the text capacity."""

    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    text_capacity: int
    strides: tuple  # ((batch, seq, head, dim) of q, of k, of v)

    @staticmethod
    def of(q: _View, k: _View, v: _View, latent, layout: str, expected_dtypes: str) -> "_Geometry":
        """Checks three views against each other and the layout; `expected_dtypes` words the dtype error."""
        _check_layout(layout)
        for name, a in (("q", q), ("k", k), ("v", v)):
            if len(a.shape) != 4:
                raise ValueError(f"invalid {name}.ndim = {len(a.shape)}: expected 4 ({layout} = {_layout_shape(layout)})")
            if a.dtype_name != q.dtype_name:
                raise TypeError(f"{name}: dtype {a.dtype_name} differs from q's {q.dtype_name}")
            if a.strides is None:
                raise ValueError(f"{name}: strides that are not a whole number of elements are not supported")
        if q.dtype is None:
            raise TypeError(f"q: dtype {q.dtype_name} is not supported: expected {expected_dtypes}")

        def bshd(a: _View):  # (B, S, H, D) sizes and element strides of either layout
            sizes, st = a.shape, a.strides
            if layout == "bhsd":
                sizes, st = (sizes[0], sizes[2], sizes[1], sizes[3]), (st[0], st[2], st[1], st[3])
            return tuple(sizes), tuple(st)

        (B, S, Hq, D), sq = bshd(q)
        (Bk, Sk, Hk, Dk), sk = bshd(k)
        (Bv, Sv, Hv, Dv), sv = bshd(v)
        if (Bk, Sk, Dk) != (B, S, D) or (Bv, Sv, Hv, Dv) != (Bk, Sk, Hk, Dk):
            raise ValueError(f"invalid k/v shapes {tuple(k.shape)}, {tuple(v.shape)}: expected batch {B}, sequence "
                             f"{S} and head dim {D} like q {tuple(q.shape)}, and k and v alike")
        n_video = _volume(latent)
        if n_video > S:
            raise ValueError(f"invalid latent = {tuple(latent)}: T*H*W = {n_video} exceeds the sequence length "
                             f"S = {S} of q")
        return _Geometry(B, S, Hq, Hk, D, q.dtype, S - n_video, (sq, sk, sv))

    def same_problem(self, other: "_Geometry") -> bool:
        """Equal except for the text capacity (which depends on the latent, not on the arrays)."""
        return self._replace(text_capacity=0) == other._replace(text_capacity=0)

    def capi_strides(self, layout: str) -> dict:
        """Strides for _capi: q, k, v as given; o contiguous in `layout` (the outputs are new arrays)."""
        return {"q": self.strides[0], "k": self.strides[1], "v": self.strides[2], "o": _contiguous_strides(self, layout)}


def _contiguous_strides(g: _Geometry, layout: str):
    H, S, D = g.q_heads, g.seq, g.head_dim
    return (S * H * D, H * D, D, 1) if layout == "bshd" else (H * S * D, D, S * D, 1)


def _is_sequence(x) -> bool:
    """A list, tuple or array of rank >= 1 (not a scalar, a 0-d array or a string)."""
    return hasattr(x, "__len__") and not isinstance(x, (str, bytes)) and getattr(x, "ndim", 1) != 0


def _is_per_head(window) -> bool:
    return _is_sequence(window) and len(window) > 0 and _is_sequence(window[0])


def _int_list(name: str, value) -> tuple:
    """An int or a sequence of ints (one per head) -> a tuple of ints."""
    try:
        return tuple(int(x) for x in value) if _is_sequence(value) else (int(value),)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected an integer or one integer per head, got {value!r}") from None


class _PatternParams(NamedTuple):
    """A pattern and its parameters, normalised to tuples of ints (hashable, and op arguments for torch)."""

    pattern: str
    windows: tuple = ()        # ((kt, kh, kw), ...): one, or one per head
    global_frames: tuple = ()
    radius: tuple = ()
    block_offsets: tuple = ()
    block_tiles: tuple = ()


def _pattern_params(pattern, window=(3, 3, 3), global_frames=1, radius=0, block_offsets=None,
                    block_tiles=None) -> _PatternParams:
    if pattern == "sliding_tile":
        windows = tuple(_triple("window", w) for w in window) if _is_per_head(window) else (_triple("window", window),)
        return _PatternParams(pattern, windows=windows)
    if pattern == "attention_tile":
        gf, rr = _int_list("global_frames", global_frames), _int_list("radius", radius)
        if len(rr) == 1 and len(gf) > 1:
            rr = rr * len(gf)
        return _PatternParams(pattern, global_frames=gf, radius=rr)
    if pattern == "block_list":
        if block_offsets is None or block_tiles is None:
            raise ValueError("block_offsets, block_tiles: expected both for pattern = 'block_list'")
        return _PatternParams(pattern, block_offsets=tuple(int(x) for x in block_offsets),
                              block_tiles=tuple(int(x) for x in block_tiles))
    if pattern == "dense":
        return _PatternParams(pattern)
    raise ValueError(f"invalid pattern = {pattern!r}: expected one of {', '.join(_capi.PATTERNS)}")


def _make_capi_plan(g: _Geometry, latent, tile, params: _PatternParams, text_position: str, layout: str, scale,
                    device: str) -> _capi.Plan:
    return _capi.Plan(batch=g.batch, q_heads=g.q_heads, kv_heads=g.kv_heads, head_dim=g.head_dim, dtype=g.dtype,
                      latent=latent, tile=tile, text_capacity=g.text_capacity, text_position=text_position,
                      layout=layout, strides=g.capi_strides(layout), scale=float(scale or 0.0),
                      pattern=params.pattern, windows=params.windows or ((3, 3, 3),),
                      global_frames=params.global_frames or (0,), radius=params.radius or (0,),
                      block_offsets=params.block_offsets, block_tiles=params.block_tiles, device=device)


def _text_len_values(text_len, batch: int, capacity: int | None = None) -> tuple:
    """An int or one int per batch element -> a tuple of `batch` ints, each checked against `capacity`."""
    if _is_sequence(text_len):
        values = tuple(int(x) for x in (text_len.reshape(-1) if hasattr(text_len, "reshape") else text_len))
        if len(values) != batch:
            raise ValueError(f"invalid text_len with {len(values)} values: expected an int or {batch} values (one "
                             "per batch element)")
    else:
        try:
            values = (int(text_len),) * batch
        except (TypeError, ValueError):
            raise TypeError(f"text_len: expected an int or one int per batch element, got {text_len!r}") from None
    if capacity is not None:
        for b, x in enumerate(values):
            if not 0 <= x <= capacity:
                raise ValueError(f"invalid text_len[{b}] = {x}: expected 0 to the text capacity {capacity} "
                                 "(S - T*H*W)")
    return values


# --- torch dispatch (torch is never imported here; tilewise._torch is loaded once a tensor is seen) ---

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


def _numpy_array(name: str, a) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(a).__name__}")
    return a


_NUMPY_EXPECTED = "float32, float64 or float16"


class Plan:
    """A planned attention for arrays of one geometry: create once, call many times.

        plan = tilewise.Plan(q, k, v, latent=(8, 16, 16), tile=(2, 4, 4), pattern="sliding_tile", window=(3, 3, 3))
        o = plan(q, k, v, text_len=20)

    numpy arrays run on the CPU backend; torch tensors on their device (CPU backend, or the Hopper kernel for
    CUDA tensors, on the current stream at each call). A plan must not run on two CUDA streams at once.
    """

    def __init__(self, q, k, v, *, latent, tile=(6, 8, 8), pattern="sliding_tile", window=(3, 3, 3),
                 global_frames=1, radius=0, block_offsets=None, block_tiles=None, text_position="last",
                 layout="bshd", scale=None):
        latent, tile = _triple("latent", latent), _triple("tile", tile)
        params = _pattern_params(pattern, window, global_frames, radius, block_offsets, block_tiles)
        self._torch = _is_torch(q)
        self._layout = layout
        if self._torch:
            self._geometry, self._device, self._plan = _torch_module().make_plan(q, k, v, latent, tile, params,
                                                                                 text_position, layout, scale)
        else:
            self._geometry = _Geometry.of(*(_View.numpy(_numpy_array(n, a)) for n, a in (("q", q), ("k", k), ("v", v))),
                                          latent, layout, _NUMPY_EXPECTED)
            self._device = "cpu"
            self._plan = _make_capi_plan(self._geometry, latent, tile, params, text_position, layout, scale, "cpu")

    def __call__(self, q, k, v, *, text_len=None, return_lse=False):
        if self._torch != _is_torch(q):
            raise TypeError(f"q: expected a {'torch tensor' if self._torch else 'numpy array'} like the ones this "
                            "Plan was made for")
        if self._torch:
            o, lse = _torch_module().run_plan(self, q, k, v, text_len, return_lse)
            return (o, lse) if return_lse else o
        g = _Geometry.of(*(_View.numpy(_numpy_array(n, a)) for n, a in (("q", q), ("k", k), ("v", v))),
                         (0, 0, 0), self._layout, _NUMPY_EXPECTED)
        if not g.same_problem(self._geometry):
            raise ValueError("q/k/v: shapes, strides or dtype differ from the ones this Plan was made for")
        o = np.empty(q.shape, dtype=q.dtype)  # contiguous in the plan's layout
        lse = np.empty((g.batch, g.q_heads, g.seq), dtype=np.float32) if return_lse else None
        lens = None if text_len is None else np.array(
            _text_len_values(text_len, g.batch, self._geometry.text_capacity), dtype=np.int32)
        self._plan.run(q.ctypes.data, k.ctypes.data, v.ctypes.data, o.ctypes.data,
                       lse.ctypes.data if lse is not None else 0, lens.ctypes.data if lens is not None else 0)
        return (o, lse) if return_lse else o

    def flops(self, text_len=None) -> float:
        lens = None if text_len is None else list(_text_len_values(text_len, self._geometry.batch))
        return self._plan.flops(lens)

    def density(self) -> float:
        return self._plan.density()


def _attention(q, k, v, *, latent, tile, params: _PatternParams, text_len, text_position, layout, scale, return_lse):
    if _is_torch(q):
        return _torch_module().attention(q, k, v, latent=latent, tile=tile, params=params, text_len=text_len,
                                         text_position=text_position, layout=layout, scale=scale,
                                         return_lse=return_lse)
    plan = Plan(q, k, v, latent=latent, tile=tile, pattern=params.pattern, window=params.windows or (3, 3, 3),
                global_frames=params.global_frames or 1, radius=params.radius or 0,
                block_offsets=params.block_offsets, block_tiles=params.block_tiles, text_position=text_position,
                layout=layout, scale=scale)
    return plan(q, k, v, text_len=text_len, return_lse=return_lse)


def sliding_tile_attention(q, k, v, *, latent, tile=(6, 8, 8), window, text_len=None, text_position="last",
                           layout="bshd", scale=None, return_lse=False):
    """Sliding Tile Attention: each query tile sees a window of (kt, kh, kw) key tiles (one window for all
    heads, or a list with one per head), plus every valid text key.

    q, k, v: numpy arrays (CPU backend) or torch tensors (CPU backend, or the Hopper kernel for CUDA tensors,
    through the custom op torch.ops.tilewise.attention_fwd). text_len: None (all text valid), an int, one int
    per batch element, or (torch) an integer tensor [B] on q's device. Returns o shaped like q (contiguous in
    `layout`), and with return_lse=True also the float32 LSE [B, Hq, S]."""
    return _attention(q, k, v, latent=latent, tile=tile, params=_pattern_params("sliding_tile", window=window),
                      text_len=text_len, text_position=text_position, layout=layout, scale=scale,
                      return_lse=return_lse)


def attention_tile(q, k, v, *, latent, tile=(1, 8, 8), global_frames, radius=0, text_len=None,
                   text_position="last", layout="bshd", scale=None, return_lse=False):
    """Efficient-vDiT's frame pattern: frames < global_frames see and are seen by everything; other frames
    see frames within `radius` of their own. Per-head values may be given as sequences."""
    return _attention(q, k, v, latent=latent, tile=tile,
                      params=_pattern_params("attention_tile", global_frames=global_frames, radius=radius),
                      text_len=text_len, text_position=text_position, layout=layout, scale=scale,
                      return_lse=return_lse)


def block_sparse_attention(q, k, v, *, latent, tile, block_offsets: Sequence[int], block_tiles: Sequence[int],
                           text_len=None, text_position="last", layout="bshd", scale=None, return_lse=False):
    """Explicit key tiles per (head, query tile), CSR: tiles of query tile t of head h are
    block_tiles[block_offsets[h * num_tiles + t] : block_offsets[h * num_tiles + t + 1]], ascending."""
    return _attention(q, k, v, latent=latent, tile=tile,
                      params=_pattern_params("block_list", block_offsets=block_offsets, block_tiles=block_tiles),
                      text_len=text_len, text_position=text_position, layout=layout, scale=scale,
                      return_lse=return_lse)


def dense_attention(q, k, v, *, latent, tile=(6, 8, 8), text_len=None, text_position="last", layout="bshd",
                    scale=None, return_lse=False):
    """Full attention over the video plus the valid text keys (the dense reference of the same problem)."""
    return _attention(q, k, v, latent=latent, tile=tile, params=_pattern_params("dense"), text_len=text_len,
                      text_position=text_position, layout=layout, scale=scale, return_lse=return_lse)


def _reorder(x, latent, tile, text_position, to_tiled: bool):
    if _is_torch(x):
        return _torch_module().reorder(x, latent, tile, text_position, to_tiled)
    x = _numpy_array("x", x)
    if x.ndim != 4 or not x.flags.c_contiguous:
        raise ValueError(f"invalid x with shape {x.shape}: expected a contiguous [B, S, H, D] array")
    if x.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported: expected {_NUMPY_EXPECTED}")
    latent, tile = _triple("latent", latent), _triple("tile", tile)
    B, S, H, D = x.shape
    text = S - _volume(latent)
    if text < 0:
        raise ValueError(f"invalid latent = {latent}: T*H*W exceeds the sequence length S = {S} of x")
    problem = _capi.make_problem(batch=B, q_heads=H, kv_heads=H, head_dim=D, dtype=_NUMPY_DTYPES[x.dtype],
                                 latent=latent, tile=tile, text_capacity=text, text_position=text_position)
    out = np.empty_like(x)
    _capi.reorder(problem, x.ctypes.data, out.ctypes.data, to_tiled)
    return out


def tile(x, *, latent, tile, text_position="last"):
    """Raster -> tiled order of the video tokens of a [B, S, H, D] array or tensor (text copied through).
    numpy arrays must be contiguous; torch tensors may be any [B, S, ...] tensor on any device."""
    return _reorder(x, latent, tile, text_position, True)


def untile(x, *, latent, tile, text_position="last"):
    """Tiled -> raster order; the inverse of tile()."""
    return _reorder(x, latent, tile, text_position, False)
