"""The torch front end: the custom ops `torch.ops.tilewise.attention_fwd` / `attention_bwd`, their autograd
registration, and the torch side of tilewise.Plan and tile / untile.

Loaded by `tilewise._api` when a torch tensor is first seen (or by `import tilewise` when torch is already
imported), so that `import tilewise` never needs torch. Argument handling is `tilewise._args`, shared with the
numpy front end; this module only turns tensors into `_args.ArrayView`s and pointers.

- The public functions call `attention_fwd` with every pattern parameter as an op argument, so
  `torch.compile(fullgraph=True)` traces them without a graph break (the fake implementations give the output
  shapes), and autograd and AOTAutograd see one op with a registered backward (`attention_bwd`).
- The forward always computes the log-sum-exp: the backward needs it, and it is a second (differentiable)
  output, returned to the caller only with return_lse=True.
- Plans are cached by everything a plan depends on (shapes, strides, dtype, device and the call's parameters).
  Each run gets its scratch (the forward's tile counter, the backward's fp32 accumulators) from `torch.empty` on
  the current stream, so one plan runs on several streams at once and inside CUDA graphs (the allocation is
  stream-ordered, and captured allocations come from the graph's pool). What cannot be captured is creating a
  plan (host planning, table uploads): a capture needs an eager warm-up call of the same geometry first.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from tilewise import _args, _capi, _numpy

DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _device_kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _expected_dtypes(device: torch.device) -> str:
    return "torch.bfloat16 or torch.float16 on CUDA" if device.type == "cuda" else \
        "torch.float32, torch.float64, torch.float16 or torch.bfloat16 on the CPU"


def _view(t: torch.Tensor) -> _args.ArrayView:
    return _args.ArrayView(tuple(t.shape), tuple(t.stride()), DTYPES.get(t.dtype), str(t.dtype))


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else _NoGuard()


def operands(q, k, v, latent, layout: str) -> _args.Operands:
    """_args.Operands of three tensors on one CPU or CUDA device."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor like q, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name}: on device {t.device}, expected q's device {q.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q: on device {q.device}, expected a CPU or CUDA tensor")
    # The support question (a ctypes call, answered once) is asked eagerly; a compiled call that the device
    # cannot run fails when its plan is made, with the same message.
    device = None if torch.compiler.is_compiling() else _device_kind(q.device)
    with _device_guard(q.device):
        return _args.Operands.of(_view(q), _view(k), _view(v), latent, layout, device, _expected_dtypes(q.device))


def _text_len_args(text_len, q: torch.Tensor, ops: _args.Operands):
    """-> (tensor or None, host values or ()): a tensor stays on the device (no host read); ints are checked."""
    if text_len is None:
        return None, ()
    if isinstance(text_len, torch.Tensor):
        if tuple(text_len.shape) != (ops.batch,):
            raise ValueError(f"invalid text_len with shape {tuple(text_len.shape)}: expected a tensor "
                             f"[{ops.batch}] (one length per batch element)")
        if text_len.dtype not in _INT_DTYPES:
            raise TypeError(f"text_len: dtype {text_len.dtype} is not supported: expected an integer tensor "
                            "(torch.int32 is used as is)")
        if text_len.device != q.device:
            raise ValueError(f"text_len: on device {text_len.device}, expected q's device {q.device} (it is read "
                             "where the kernel runs, without a host sync)")
        return text_len, ()
    return None, _args.text_len_values(text_len, ops.batch, ops.text_capacity)


def _op_args(call: _args.Call, deterministic: bool) -> tuple:
    """The op's non-tensor arguments, in schema order, from a checked Call."""
    p = call.params
    return (list(call.latent), list(call.tile), p.pattern, p.flat_windows(), list(p.global_frames),
            list(p.radius), list(p.block_offsets), list(p.block_tiles), call.text_position, call.order, call.layout,
            float(call.scale), int(call.head_offset), bool(deterministic))


def _call_of(latent, tile, pattern, windows, global_frames, radius, block_offsets, block_tiles, text_position, order,
             layout, scale, head_offset) -> _args.Call:
    params = _args.PatternParams.from_flat(pattern, windows, global_frames, radius, block_offsets, block_tiles)
    return _args.Call(tuple(latent), tuple(tile), params, text_position, order, layout, scale, head_offset)


def attention(q, k, v, call: _args.Call, text_len, return_lse: bool, deterministic: Optional[bool]):
    """The torch side of the public functions: checks, then the custom op (differentiable)."""
    ops = operands(q, k, v, call.latent, call.layout)
    tl, values = _text_len_args(text_len, q, ops)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    o, lse = attention_fwd(q, k, v, tl, list(values), *_op_args(call, deterministic))
    return (o, lse) if return_lse else o


# --- plan cache, workspaces, text lengths ---

_plans: dict = {}      # problem key -> _capi.Plan (with .forward_bytes, .backward_bytes)
_text_lens: dict = {}  # (values, device) -> int32 tensor


def clear_plan_cache() -> None:
    """Drops every cached plan and text-length tensor (rebuilt on the next call, outside capture). Don't call it
    while CUDA graphs that use the plans are alive: they reference the plans' device tables."""
    _plans.clear()
    _text_lens.clear()


def plan_cache_size() -> int:
    return len(_plans)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _plan_for(q, k, v, call: _args.Call) -> _capi.Plan:
    key = (tuple(q.shape), tuple(q.stride()), tuple(k.shape), tuple(k.stride()), tuple(v.shape), tuple(v.stride()),
           q.dtype, q.device, call)
    plan = _plans.get(key)
    if plan is None:
        if _capturing(q.device):
            raise RuntimeError("tilewise: no plan for this call during CUDA graph capture (creating one does host "
                               "planning and table uploads): run the same call once eagerly first")
        ops = operands(q, k, v, call.latent, call.layout)
        plan = _args.make_plan(ops, call, _device_kind(q.device))
        plan.forward_bytes, plan.backward_bytes = plan.workspace_bytes(), plan.backward_workspace_bytes()
        _plans[key] = plan
    return plan


def _workspace(nbytes: int, device: torch.device) -> Optional[torch.Tensor]:
    """Scratch for one run, from the torch allocator on the current stream (None when the plan needs none)."""
    if nbytes == 0:
        return None
    ws = torch.empty(nbytes, dtype=torch.uint8, device=device)
    assert ws.data_ptr() % 256 == 0  # the caching allocator hands out 512-byte aligned blocks
    return ws


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _text_len_tensor(text_len: Optional[torch.Tensor], values, device: torch.device) -> Optional[torch.Tensor]:
    """int32 lengths on `device` (None = all valid)."""
    if text_len is not None:
        if text_len.dtype != torch.int32 or not text_len.is_contiguous():
            text_len = text_len.to(torch.int32).contiguous()  # on the device, stream-ordered
        return text_len
    if not values:
        return None
    key = (tuple(values), device)
    t = _text_lens.get(key)
    if t is None:
        if _capturing(device):
            raise RuntimeError(f"tilewise: text_len {list(values)} has no device copy yet during CUDA graph "
                               "capture: run the call once eagerly before capturing, or pass a device tensor")
        t = _text_lens[key] = torch.tensor(list(values), dtype=torch.int32, device=device)
    return t


def _lse_shape(q, layout: str) -> tuple:
    return (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else (q.shape[0], q.shape[1], q.shape[2])


def _forward(plan: _capi.Plan, q, k, v, text_len, values, layout: str):
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous in `layout`, as the plan's o strides
    lse = torch.empty(_lse_shape(q, layout), dtype=torch.float32, device=q.device)
    tl = _text_len_tensor(text_len, values, q.device)
    ws = _workspace(plan.forward_bytes, q.device)
    plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), _ptr(tl), _stream(q.device),
             _ptr(ws))
    return o, lse


# --- the ops ---

@torch.library.custom_op("tilewise::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: Optional[torch.Tensor],
                  text_len_values: List[int], latent: List[int], tile: List[int], pattern: str, windows: List[int],
                  global_frames: List[int], radius: List[int], block_offsets: List[int], block_tiles: List[int],
                  text_position: str, order: str, layout: str, scale: float, head_offset: int,
                  deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tile-sparse attention forward. windows: flattened (kt, kh, kw) triples; text_len (device tensor) or
    text_len_values (host ints, [] = all valid); deterministic: for the backward. Returns o (contiguous in
    `layout`) and the float32 LSE [B, Hq, S]."""
    call = _call_of(latent, tile, pattern, windows, global_frames, radius, block_offsets, block_tiles, text_position,
                    order, layout, scale, head_offset)
    with _device_guard(q.device):
        return _forward(_plan_for(q, k, v, call), q, k, v, text_len, text_len_values, layout)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, text_len, text_len_values, latent, tile, pattern, windows, global_frames, radius,
                        block_offsets, block_tiles, text_position, order, layout, scale, head_offset, deterministic):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, layout), dtype=torch.float32)


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    """x itself when torch.empty_like keeps its strides (dense, non-overlapping), else a dense copy: gradients
    are written with their input's strides, and a strided view (e.g. of a fused QKV buffer) has gaps."""
    if torch.empty_like(x).stride() == x.stride():
        return x
    return torch.empty_like(x).copy_(x)


@torch.library.custom_op("tilewise::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, text_len: Optional[torch.Tensor],
                  text_len_values: List[int], latent: List[int], tile: List[int], pattern: str, windows: List[int],
                  global_frames: List[int], radius: List[int], block_offsets: List[int], block_tiles: List[int],
                  text_position: str, order: str, layout: str, scale: float, head_offset: int,
                  deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile-sparse attention backward (docs/semantics.md, "Gradients"): dq, dk, dv (shaped like q, k, v) from the
    upstream dout (like o) and dlse (like lse, None = zero), with the forward's o and lse."""
    call = _call_of(latent, tile, pattern, windows, global_frames, radius, block_offsets, block_tiles, text_position,
                    order, layout, scale, head_offset)
    q, k, v = _dense_like(q), _dense_like(k), _dense_like(v)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # The plan reads o and dout with the forward's output strides (contiguous in the layout), lse / dlse [B, H, S].
    o, dout, lse = o.contiguous(), dout.to(o.dtype).contiguous(), lse.contiguous()
    dlse = None if dlse is None else dlse.to(torch.float32).contiguous()
    with _device_guard(q.device):
        plan = _plan_for(q, k, v, call)
        tl = _text_len_tensor(text_len, text_len_values, q.device)
        ws = _workspace(plan.backward_bytes, q.device)
        plan.run_backward(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), o=o.data_ptr(), lse=lse.data_ptr(),
                          dout=dout.data_ptr(), dlse=_ptr(dlse), dq=dq.data_ptr(), dk=dk.data_ptr(),
                          dv=dv.data_ptr(), text_len=_ptr(tl), workspace=_ptr(ws), deterministic=deterministic,
                          stream=_stream(q.device))
    return dq, dk, dv


@attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, o, lse, text_len, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, text_len, *args = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, text_len)
    ctx.args = args  # text_len_values and the pattern parameters, in schema order


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, text_len = ctx.saved_tensors
    dq, dk, dv = torch.ops.tilewise.attention_bwd(grad_o, grad_lse, q, k, v, o, lse, text_len, *ctx.args)
    return (dq, dk, dv, None) + (None,) * len(ctx.args)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- tilewise.Plan on tensors ---

class Runner:
    """A library plan for tensors of one geometry on one device (the torch side of tilewise.Plan). Runs without
    autograd on its own plan; a call that needs gradients goes through the differentiable op instead."""

    def __init__(self, q, k, v, call: _args.Call):
        self.call = call
        self.operands = operands(q, k, v, call.latent, call.layout)
        self.device = q.device
        with _device_guard(q.device):
            self.plan = _args.make_plan(self.operands, call, _device_kind(q.device))
            self.plan.forward_bytes = self.plan.workspace_bytes()

    def __call__(self, q, k, v, text_len, return_lse: bool):
        ops = operands(q, k, v, (0, 0, 0), self.call.layout)
        if not ops.same_arrays(self.operands) or q.device != self.device:
            raise ValueError(f"q/k/v: shapes, strides, dtype or device differ from the ones this Plan was made for "
                             f"({self.device})")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return attention(q, k, v, self.call, text_len, True, None)
        tl, values = _text_len_args(text_len, q, self.operands)
        with _device_guard(q.device):
            o, lse = _forward(self.plan, q, k, v, tl, values, self.call.layout)
        return o, (lse if return_lse else None)


# --- tile / untile ---

_permutations: dict = {}


def reorder(x: torch.Tensor, latent, tile, text_position: str, to_tiled: bool) -> torch.Tensor:
    """Raster <-> tiled order along dim 1 of a [B, S, ...] tensor: a gather by the permutation that the core's
    tw_tile / tw_untile apply to the positions 0..S-1 (so the order is defined in one place, the core)."""
    if x.dim() != 4:
        raise ValueError(f"invalid x with shape {tuple(x.shape)}: expected a [B, S, H, D] tensor")
    latent, tile = _args.triple("latent", latent), _args.triple("tile", tile)
    S = x.shape[1]
    key = (S, latent, tile, text_position, to_tiled, x.device)
    perm = _permutations.get(key)
    if perm is None:
        positions = np.arange(S, dtype=np.float64).reshape(1, S, 1, 1)  # exact up to 2^53
        order = _numpy.reorder(positions, latent, tile, text_position, to_tiled)[0, :, 0, 0]
        perm = _permutations[key] = torch.from_numpy(order.astype(np.int64)).to(x.device)
    return x.index_select(1, perm)
