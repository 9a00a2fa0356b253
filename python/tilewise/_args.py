"""Argument handling shared by the numpy and torch front ends (`_numpy`, `_torch`): what an array is
(`ArrayView`), what three arrays imply (`Operands`), and the scalar arguments (integers, windows, pattern
parameters, text lengths, enum strings) normalised to plain Python values.

Nothing here imports torch or numpy's front end, and nothing re-derives geometry: tile grids, window clamping
and "is this dtype / head dim supported" come from the library (`_capi`). The rule for integers is strict
(issue 14: a float must never be truncated silently): Python ints, numpy / torch integer scalars and 0-d integer
arrays are accepted, through `operator.index`; floats, bools and strings are a TypeError naming the argument and
the value. The one string form accepted is a window's "KTxKHxKW" (the calibrate CLI's spelling), everywhere a
window is taken.
"""
from __future__ import annotations

import numbers
import operator
import re
from typing import NamedTuple, Optional

from tilewise import _capi

Triple = tuple[int, int, int]

_WINDOW_TEXT = re.compile(r"^\s*(\d+)x(\d+)x(\d+)\s*$")


def _is_bool(value) -> bool:
    return isinstance(value, bool) or "bool" in str(getattr(value, "dtype", ""))


def integer(name: str, value) -> int:
    """An integer argument as an int; anything that is not an integer type is refused (never truncated)."""
    if not _is_bool(value) and not isinstance(value, (str, bytes)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")


def is_sequence(x) -> bool:
    """A list, tuple or array of rank >= 1 (not a scalar, a 0-d array or a string)."""
    return hasattr(x, "__len__") and not isinstance(x, (str, bytes)) and getattr(x, "ndim", 1) != 0


def triple(name: str, value) -> Triple:
    """Three integers (t, h, w)."""
    if not is_sequence(value):
        raise TypeError(f"{name}: expected three integers (t, h, w), got {value!r}")
    items = list(value)
    if len(items) != 3:
        raise ValueError(f"invalid {name} = {value!r}: expected three integers (t, h, w)")
    return tuple(integer(f"{name}[{a}]", x) for a, x in enumerate(items))


def window(name: str, value) -> Triple:
    """One window: three integers (kt, kh, kw) or the text "KTxKHxKW" (e.g. "3x3x3")."""
    if isinstance(value, str):
        m = _WINDOW_TEXT.match(value)
        if not m:
            raise ValueError(f"invalid {name} = {value!r}: expected (kt, kh, kw) or the text 'KTxKHxKW', e.g. "
                             "'3x3x3'")
        return tuple(int(x) for x in m.groups())
    return triple(name, value)


def windows(value, name: str = "window") -> tuple:
    """One window for every head, or one per head (a sequence of windows) -> a tuple of triples."""
    per_head = is_sequence(value) and len(value) > 0 and (isinstance(value[0], str) or is_sequence(value[0]))
    if per_head:
        return tuple(window(f"{name}[{h}]", w) for h, w in enumerate(value))
    return (window(name, value),)


def int_list(name: str, value) -> tuple:
    """An integer or a sequence of integers (one per head) -> a tuple of ints."""
    if is_sequence(value):
        return tuple(integer(f"{name}[{i}]", x) for i, x in enumerate(value))
    return (integer(name, value),)


def int_sequence(name: str, value) -> tuple:
    """A sequence of integers (e.g. a CSR table) -> a tuple of ints."""
    if not is_sequence(value):
        raise TypeError(f"{name}: expected a sequence of integers, got {value!r}")
    flat = value.reshape(-1) if hasattr(value, "reshape") else value
    return tuple(integer(f"{name}[{i}]", x) for i, x in enumerate(flat))


def choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"invalid {name} = {value!r}: expected one of {', '.join(repr(o) for o in options)}")
    return value


def scale_arg(value) -> float:
    """None (= 1/sqrt(D)) or a real number -> a float (0.0 = the default)."""
    if value is None:
        return 0.0
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale: expected a number or None, got {value!r} ({type(value).__name__})")
    return float(value)


def volume(t) -> int:
    return t[0] * t[1] * t[2]


# --- arrays ---

class ArrayView(NamedTuple):
    """One array as the core sees it: logical shape, strides in elements, and dtype.

    `dtype` is the tilewise name ("f32", "f64", "f16", "bf16", or "e4m3" for FP8 inputs quantised by the caller)
    or None when the framework's dtype has no tilewise counterpart; `dtype_name` is the framework's own name, for
    messages."""

    shape: tuple
    strides: Optional[tuple]
    dtype: Optional[str]
    dtype_name: str


def layout_shape(layout: str) -> str:
    return "[B, S, H, D]" if layout == "bshd" else "[B, H, S, D]"


class Operands(NamedTuple):
    """What a call's q, k, v imply: sizes, the plan's dtype (the output's: for e4m3 inputs the one asked for),
    element strides (batch, seq, head, dim), text capacity and the library's precision ("fp8_scaled" for e4m3
    inputs)."""

    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    text_capacity: int
    strides: tuple  # ((batch, seq, head, dim) of q, of k, of v)
    precision: str = "native"

    @staticmethod
    def of(q: ArrayView, k: ArrayView, v: ArrayView, latent: Triple, layout: str, device: Optional[str],
           expected_dtypes: str, precision: str = "native", out_dtype: Optional[str] = None) -> "Operands":
        """Checks three views against each other, the layout, the precision and what `device` supports (asked
        of the library; None skips that question); `expected_dtypes` words the dtype errors. e4m3 inputs need
        precision "fp8" (they run as the library's fp8_scaled, with the output in `out_dtype`, default bf16)."""
        choice("layout", layout, _capi.LAYOUTS)
        for name, a in (("q", q), ("k", k), ("v", v)):
            if len(a.shape) != 4:
                raise ValueError(f"invalid {name}.ndim = {len(a.shape)}: expected 4 ({layout} = "
                                 f"{layout_shape(layout)})")
            if a.dtype_name != q.dtype_name:
                raise TypeError(f"{name}: dtype {a.dtype_name} differs from q's {q.dtype_name}")
            if a.strides is None:
                raise ValueError(f"{name}: strides that are not a whole number of elements are not supported")
        if q.dtype is None:
            raise TypeError(f"q: dtype {q.dtype_name} is not supported: expected {expected_dtypes}")
        dtype, lib_precision = q.dtype, precision
        if q.dtype == "e4m3":
            if precision != "fp8":
                raise TypeError(f"q: dtype {q.dtype_name} (FP8 inputs quantised by the caller) needs precision='fp8' "
                                f"and scales=(q_scale, k_scale, v_scale), got precision={precision!r}")
            dtype, lib_precision = out_dtype or "bf16", "fp8_scaled"
        elif out_dtype is not None and out_dtype != q.dtype:
            raise ValueError(f"invalid out_dtype = {out_dtype!r}: expected None (the output is in q's dtype "
                             f"{q.dtype_name}; only e4m3 inputs take another output dtype)")

        def bshd(a: ArrayView):  # (B, S, H, D) sizes and element strides of either layout
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
        refused = None if device is None else _capi.device_support(device, dtype, D, lib_precision)
        if refused is not None:
            if refused.argument == "dtype":
                name = q.dtype_name if q.dtype != "e4m3" else f"{dtype} (out_dtype)"
                raise TypeError(f"q: dtype {name} is not supported on {device}: expected {expected_dtypes} "
                                f"({refused})")
            if refused.argument == "precision":
                raise _capi.TilewiseError(str(refused), refused.argument)
            raise _capi.TilewiseError(f"q: {refused}", refused.argument)
        n_video = volume(latent)
        if n_video > S:
            raise ValueError(f"invalid latent = {tuple(latent)}: T*H*W = {n_video} exceeds the sequence length "
                             f"S = {S} of q")
        return Operands(B, S, Hq, Hk, D, dtype, S - n_video, (sq, sk, sv), lib_precision)

    def same_arrays(self, other: "Operands") -> bool:
        """Equal except for the text capacity (which depends on the latent, not on the arrays)."""
        return self._replace(text_capacity=0) == other._replace(text_capacity=0)

    def output_strides(self, layout: str) -> tuple:
        """o (and dout): a new array contiguous in `layout`."""
        H, S, D = self.q_heads, self.seq, self.head_dim
        return (S * H * D, H * D, D, 1) if layout == "bshd" else (H * S * D, D, S * D, 1)


# --- pattern and call parameters ---

class PatternParams(NamedTuple):
    """A pattern and its parameters, normalised to tuples of ints (hashable, and op arguments for torch)."""

    pattern: str
    windows: tuple = ()        # ((kt, kh, kw), ...): one, or one per head
    global_frames: tuple = ()
    radius: tuple = ()
    block_offsets: tuple = ()
    block_tiles: tuple = ()

    @staticmethod
    def of(pattern, window=(3, 3, 3), global_frames=1, radius=0, block_offsets=None,
           block_tiles=None) -> "PatternParams":
        choice("pattern", pattern, _capi.PATTERNS)
        if pattern == "sliding_tile":
            return PatternParams(pattern, windows=windows(window))
        if pattern == "attention_tile":
            gf, rr = int_list("global_frames", global_frames), int_list("radius", radius)
            if len(rr) == 1 and len(gf) > 1:
                rr = rr * len(gf)
            return PatternParams(pattern, global_frames=gf, radius=rr)
        if pattern == "block_list":
            if block_offsets is None or block_tiles is None:
                raise ValueError("block_offsets, block_tiles: expected both for pattern = 'block_list'")
            return PatternParams(pattern, block_offsets=int_sequence("block_offsets", block_offsets),
                                 block_tiles=int_sequence("block_tiles", block_tiles))
        return PatternParams(pattern)

    def flat_windows(self) -> list:
        return [x for w in self.windows for x in w]

    @staticmethod
    def from_flat(pattern, windows, global_frames, radius, block_offsets, block_tiles) -> "PatternParams":
        return PatternParams(pattern, tuple(tuple(windows[i:i + 3]) for i in range(0, len(windows), 3)),
                             tuple(global_frames), tuple(radius), tuple(block_offsets), tuple(block_tiles))


PRECISIONS = ("native", "fp8")  # what callers choose; e4m3 inputs make the library's "fp8_scaled"


class Call(NamedTuple):
    """Everything a plan depends on besides the arrays, checked and normalised."""

    latent: Triple
    tile: Triple
    params: PatternParams
    text_position: str = "last"
    order: str = "raster"
    layout: str = "bshd"
    scale: float = 0.0
    head_offset: int = 0
    precision: str = "native"      # "native" or "fp8" (docs/semantics.md §11)
    out_dtype: Optional[str] = None  # e4m3 inputs only: the output's tilewise dtype (None = bf16)
    sm_margin: int = 0             # SMs the CUDA kernels leave free (an execution option: results unchanged)

    @staticmethod
    def of(*, latent, tile, params: PatternParams, text_position="last", order="raster", layout="bshd",
           scale=None, head_offset=0, precision="native", out_dtype=None, sm_margin=0) -> "Call":
        return Call(triple("latent", latent), triple("tile", tile), params,
                    choice("text_position", text_position, _capi.TEXT_POSITIONS), choice("order", order, _capi.ORDERS),
                    choice("layout", layout, _capi.LAYOUTS), scale_arg(scale),
                    integer("head_offset", head_offset), choice("precision", precision, PRECISIONS), out_dtype,
                    integer("sm_margin", sm_margin))


def make_plan(ops: Operands, call: Call, device: str) -> _capi.Plan:
    """A library plan for these operands (q, k, v with their strides; o contiguous in the layout)."""
    p = call.params
    strides = {"q": ops.strides[0], "k": ops.strides[1], "v": ops.strides[2], "o": ops.output_strides(call.layout)}
    return _capi.Plan(batch=ops.batch, q_heads=ops.q_heads, kv_heads=ops.kv_heads, head_dim=ops.head_dim,
                      dtype=ops.dtype, latent=call.latent, tile=call.tile, text_capacity=ops.text_capacity,
                      text_position=call.text_position, order=call.order, layout=call.layout, strides=strides,
                      scale=call.scale, head_offset=call.head_offset, pattern=p.pattern,
                      windows=p.windows or ((3, 3, 3),), global_frames=p.global_frames or (0,),
                      radius=p.radius or (0,), block_offsets=p.block_offsets, block_tiles=p.block_tiles,
                      device=device, precision=ops.precision, sm_margin=call.sm_margin)


def text_len_values(text_len, batch: int, capacity: Optional[int] = None) -> tuple:
    """An integer or one integer per batch element -> a tuple of `batch` ints, each checked against `capacity`."""
    if is_sequence(text_len):
        flat = text_len.reshape(-1) if hasattr(text_len, "reshape") else text_len
        values = tuple(integer(f"text_len[{b}]", x) for b, x in enumerate(flat))
        if len(values) != batch:
            raise ValueError(f"invalid text_len with {len(values)} values: expected an int or {batch} values (one "
                             "per batch element)")
    else:
        values = (integer("text_len", text_len),) * batch
    if capacity is not None:
        for b, x in enumerate(values):
            if not 0 <= x <= capacity:
                raise ValueError(f"invalid text_len[{b}] = {x}: expected 0 to the text capacity {capacity} "
                                 "(S - T*H*W)")
    return values
