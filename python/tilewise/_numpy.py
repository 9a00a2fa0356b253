"""The numpy front end: numpy arrays run on the CPU backend, synchronously, through the C ABI."""
from __future__ import annotations

from typing import Optional

import numpy as np

from tilewise import _args, _capi

DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", np.dtype(np.float16): "f16"}
EXPECTED_DTYPES = "float32, float64 or float16"


def array(name: str, a) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(a).__name__}")
    return a


def view(name: str, a) -> _args.ArrayView:
    a = array(name, a)
    strides = None if any(s % a.itemsize for s in a.strides) else tuple(s // a.itemsize for s in a.strides)
    return _args.ArrayView(tuple(a.shape), strides, DTYPES.get(a.dtype), str(a.dtype))


def operands(q, k, v, call: _args.Call, latent=None) -> _args.Operands:
    """_args.Operands of three arrays for `call` (latent: call.latent unless given)."""
    if call.out_dtype is not None:
        raise TypeError("out_dtype: numpy arrays have no e4m3 dtype, so the output is in q's dtype: expected None "
                        "(FP8 inputs quantised by the caller need torch.float8_e4m3fn tensors)")
    return _args.Operands.of(view("q", q), view("k", k), view("v", v), call.latent if latent is None else latent,
                             call.layout, "cpu", EXPECTED_DTYPES, call.precision)


def refuse_scales(scales) -> None:
    """numpy has no e4m3 dtype, so no call on numpy arrays takes scales."""
    if scales is not None:
        raise TypeError("scales: expected None for numpy arrays (e4m3 inputs need torch.float8_e4m3fn tensors)")


class Runner:
    """A library plan for numpy arrays of one geometry (the numpy side of tilewise.Plan)."""

    def __init__(self, q, k, v, call: _args.Call):
        self.call = call
        self.operands = operands(q, k, v, call)
        self.plan = _args.make_plan(self.operands, call, "cpu")

    def __call__(self, q, k, v, text_len, return_lse: bool, scales=None):
        refuse_scales(scales)
        ops = operands(q, k, v, self.call, (0, 0, 0))
        if not ops.same_arrays(self.operands):
            raise ValueError("q/k/v: shapes, strides or dtype differ from the ones this Plan was made for")
        o = np.empty(q.shape, dtype=q.dtype)  # contiguous in the plan's layout
        lse = np.empty((ops.batch, ops.q_heads, ops.seq), dtype=np.float32) if return_lse else None
        lens: Optional[np.ndarray] = None if text_len is None else np.array(
            _args.text_len_values(text_len, ops.batch, self.operands.text_capacity), dtype=np.int32)
        self.plan.run(q.ctypes.data, k.ctypes.data, v.ctypes.data, o.ctypes.data,
                      lse.ctypes.data if lse is not None else 0, lens.ctypes.data if lens is not None else 0)
        return o, lse


def reorder(x, latent, tile, text_position: str, to_tiled: bool) -> np.ndarray:
    """Raster <-> tiled order of the video tokens of a contiguous [B, S, H, D] array (tw_tile / tw_untile)."""
    x = array("x", x)
    latent, tile = _args.triple("latent", latent), _args.triple("tile", tile)
    text_position = _args.choice("text_position", text_position, _capi.TEXT_POSITIONS)
    if x.ndim != 4 or not x.flags.c_contiguous:
        raise ValueError(f"invalid x with shape {x.shape}: expected a contiguous [B, S, H, D] array")
    if x.dtype not in DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported: expected {EXPECTED_DTYPES}")
    B, S, H, D = x.shape
    text = S - _args.volume(latent)
    if text < 0:
        raise ValueError(f"invalid latent = {latent}: T*H*W exceeds the sequence length S = {S} of x")
    problem = _capi.make_problem(batch=B, q_heads=H, kv_heads=H, head_dim=D, dtype=DTYPES[x.dtype],
                                 latent=latent, tile=tile, text_capacity=text, text_position=text_position)
    out = np.empty_like(x)
    _capi.reorder(problem, x.ctypes.data, out.ctypes.data, to_tiled)
    return out
