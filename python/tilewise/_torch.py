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
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
E4M3 = torch.float8_e4m3fn  # FP8 inputs quantised by the caller (precision="fp8" with scales)
_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _device_kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _expected_dtypes(device: torch.device) -> str:
    return "torch.bfloat16 or torch.float16 on CUDA" if device.type == "cuda" else \
        "torch.float32, torch.float64, torch.float16 or torch.bfloat16 on the CPU"


def _view(t: torch.Tensor) -> _args.ArrayView:
    return _args.ArrayView(tuple(t.shape), tuple(t.stride()), "e4m3" if t.dtype == E4M3 else DTYPES.get(t.dtype),
                           str(t.dtype))


def out_dtype_name(out_dtype) -> Optional[str]:
    """out_dtype (None, a torch float dtype or its tilewise name) -> the tilewise name or None."""
    if out_dtype is None or (isinstance(out_dtype, str) and out_dtype in TORCH_DTYPES):
        return out_dtype
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in DTYPES:  # (a list is not even hashable)
        raise TypeError(f"out_dtype: expected None or one of {', '.join(map(str, DTYPES))}, got {out_dtype!r}")
    return DTYPES[out_dtype]


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else _NoGuard()


def operands(q, k, v, call: _args.Call, latent=None) -> _args.Operands:
    """_args.Operands of three tensors on one CPU or CUDA device, for `call` (latent: call.latent unless given)."""
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
        return _args.Operands.of(_view(q), _view(k), _view(v), call.latent if latent is None else latent, call.layout,
                                 device, _expected_dtypes(q.device), call.precision, call.out_dtype)


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


def _geometry_args(call: _args.Call) -> tuple:
    """The ops' pattern and geometry arguments, in schema order, from a checked Call."""
    p = call.params
    return (list(call.latent), list(call.tile), p.pattern, p.flat_windows(), list(p.global_frames),
            list(p.radius), list(p.block_offsets), list(p.block_tiles), call.text_position, call.order, call.layout,
            float(call.scale), int(call.head_offset))


def _op_args(call: _args.Call, deterministic: bool) -> tuple:
    """attention_fwd's non-tensor arguments, in schema order, from a checked Call."""
    return _geometry_args(call) + (bool(deterministic), call.precision, int(call.sm_margin))


def _call_of(latent, tile, pattern, windows, global_frames, radius, block_offsets, block_tiles, text_position, order,
             layout, scale, head_offset, precision="native", out_dtype=None, sm_margin=0) -> _args.Call:
    params = _args.PatternParams.from_flat(pattern, windows, global_frames, radius, block_offsets, block_tiles)
    return _args.Call(tuple(latent), tuple(tile), params, text_position, order, layout, scale, head_offset, precision,
                      out_dtype, sm_margin)


def _scale_tensors(scales, q: torch.Tensor, ops: _args.Operands) -> tuple:
    """The (q_scale, k_scale, v_scale) of e4m3 inputs, checked for what needs no plan (their shapes are checked
    against the plan's key blocks in the op); None where the inputs are not e4m3, which then takes no scales."""
    if ops.precision != "fp8_scaled":
        if scales is not None:
            raise ValueError(f"scales: expected None: scales come with e4m3 inputs (torch.float8_e4m3fn, quantised by "
                             f"the caller), and q is {q.dtype}")
        return None
    if not isinstance(scales, (tuple, list)) or len(scales) != 3:
        raise TypeError(f"scales: expected (q_scale, k_scale, v_scale), three float32 tensors, for e4m3 inputs, got "
                        f"{type(scales).__name__}")
    for name, t in zip(("q_scale", "k_scale", "v_scale"), scales):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name}: expected a float32 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name}: on device {t.device}, expected q's device {q.device}")
    return tuple(scales)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype the op computes in on `device` under torch.autocast (autocast's, as for SDPA, which is on its
    lower-precision list), or None where autocast is off there. The diffusers route asks the same question."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_operands(q, k, v):
    """q, k, v in autocast_dtype (a model under autocast often gives attention fp32 q and k from its norms beside
    a bf16 v); unchanged outside autocast (mixed dtypes stay an error naming them) and for e4m3 inputs."""
    dtype = autocast_dtype(q.device)
    if dtype is None or q.dtype == E4M3:
        return q, k, v
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (q, k, v))


def attention(q, k, v, call: _args.Call, text_len, return_lse: bool, deterministic: Optional[bool], scales=None):
    """The torch side of the public functions: checks, then the custom op (differentiable in native precision).
    Under torch.autocast, q, k, v are computed in the autocast dtype, as SDPA would (`autocast_operands`)."""
    if scales is None:
        q, k, v = autocast_operands(q, k, v)
    ops = operands(q, k, v, call)
    tl, values = _text_len_args(text_len, q, ops)
    given = _scale_tensors(scales, q, ops)
    if call.precision == "fp8" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("precision: 'fp8' is forward only (docs/semantics.md §11): expected inputs that do not "
                         "require grad (or torch.no_grad()), or precision='native' for training")
    if given is not None:
        o, lse = attention_fwd_fp8_scaled(q, k, v, *given, tl, list(values), *_geometry_args(call), ops.dtype,
                                          int(call.sm_margin))
    else:
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
        ops = operands(q, k, v, call)
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


def _forward(plan: _capi.Plan, q, k, v, text_len, values, layout: str, out_dtype=None, scales=None):
    """o (contiguous in `layout`, as the plan's o strides; in q's dtype unless out_dtype) and lse of one run;
    scales: e4m3 inputs' (q_scale, k_scale, v_scale), checked against the plan's shapes here."""
    o = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, layout), dtype=torch.float32, device=q.device)
    pointers = None
    if scales is not None:
        for name, t, shape in zip(("q_scale", "k_scale", "v_scale"), scales, _scale_shapes(plan, q, k, layout)):
            if tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"invalid {name} with shape {tuple(t.shape)}: expected a contiguous float32 tensor "
                                 f"{list(shape)} (docs/semantics.md §11.3)")
        pointers = tuple(t.data_ptr() for t in scales)
    tl = _text_len_tensor(text_len, values, q.device)
    ws = _workspace(plan.forward_bytes, q.device)
    plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), _ptr(tl), _stream(q.device),
             _ptr(ws), pointers)
    return o, lse


def _scale_shapes(plan: _capi.Plan, q, k, layout: str) -> tuple:
    """The shapes of q_scale [B, Hq, S], k_scale [B, Hkv, key blocks] and v_scale [B, Hkv, D] (docs/semantics.md
    §11.3) for q and k in `layout`."""
    B, H, S = _lse_shape(q, layout)
    kv = _lse_shape(k, layout)[1]
    return (B, H, S), (B, kv, plan.fp8_key_blocks()), (B, kv, q.shape[-1])


# --- the ops ---

@torch.library.custom_op("tilewise::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: Optional[torch.Tensor],
                  text_len_values: List[int], latent: List[int], tile: List[int], pattern: str, windows: List[int],
                  global_frames: List[int], radius: List[int], block_offsets: List[int], block_tiles: List[int],
                  text_position: str, order: str, layout: str, scale: float, head_offset: int,
                  deterministic: bool, precision: str = "native",
                  sm_margin: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tile-sparse attention forward. windows: flattened (kt, kh, kw) triples; text_len (device tensor) or
    text_len_values (host ints, [] = all valid); deterministic: for the backward; precision: "native" or "fp8"
    (quantised inside, forward only); sm_margin: SMs the CUDA kernels leave free (results unchanged; passed on to
    the backward). Returns o (contiguous in `layout`) and the float32 LSE [B, Hq, S]."""
    call = _call_of(latent, tile, pattern, windows, global_frames, radius, block_offsets, block_tiles, text_position,
                    order, layout, scale, head_offset, precision, sm_margin=sm_margin)
    with _device_guard(q.device):
        return _forward(_plan_for(q, k, v, call), q, k, v, text_len, text_len_values, layout)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, text_len, text_len_values, latent, tile, pattern, windows, global_frames, radius,
                        block_offsets, block_tiles, text_position, order, layout, scale, head_offset, deterministic,
                        precision="native", sm_margin=0):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, layout), dtype=torch.float32)


@torch.library.custom_op("tilewise::attention_fwd_fp8_scaled", mutates_args=())
def attention_fwd_fp8_scaled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                             k_scale: torch.Tensor, v_scale: torch.Tensor, text_len: Optional[torch.Tensor],
                             text_len_values: List[int], latent: List[int], tile: List[int], pattern: str,
                             windows: List[int], global_frames: List[int], radius: List[int],
                             block_offsets: List[int], block_tiles: List[int], text_position: str, order: str,
                             layout: str, scale: float, head_offset: int, out_dtype: str,
                             sm_margin: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward on e4m3 q, k, v (torch.float8_e4m3fn) quantised by the caller, with their float32 scales
    (docs/semantics.md §11.3: q_scale [B, Hq, S], k_scale [B, Hkv, key blocks], v_scale [B, Hkv, D]). Forward
    only. Returns o in out_dtype ("bf16", "f16", ...; contiguous in `layout`) and the float32 LSE [B, Hq, S]."""
    call = _call_of(latent, tile, pattern, windows, global_frames, radius, block_offsets, block_tiles, text_position,
                    order, layout, scale, head_offset, "fp8", out_dtype, sm_margin)
    with _device_guard(q.device):
        return _forward(_plan_for(q, k, v, call), q, k, v, text_len, text_len_values, layout, TORCH_DTYPES[out_dtype],
                        (q_scale, k_scale, v_scale))


@attention_fwd_fp8_scaled.register_fake
def _attention_fwd_fp8_scaled_fake(q, k, v, q_scale, k_scale, v_scale, text_len, text_len_values, latent, tile,
                                   pattern, windows, global_frames, radius, block_offsets, block_tiles, text_position,
                                   order, layout, scale, head_offset, out_dtype, sm_margin=0):
    return (q.new_empty(q.shape, dtype=TORCH_DTYPES[out_dtype]),
            q.new_empty(_lse_shape(q, layout), dtype=torch.float32))


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
                  deterministic: bool, precision: str = "native",
                  sm_margin: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile-sparse attention backward (docs/semantics.md, "Gradients"): dq, dk, dv (shaped like q, k, v) from the
    upstream dout (like o) and dlse (like lse, None = zero), with the forward's o and lse. The library refuses
    precision "fp8" (forward only)."""
    call = _call_of(latent, tile, pattern, windows, global_frames, radius, block_offsets, block_tiles, text_position,
                    order, layout, scale, head_offset, precision, sm_margin=sm_margin)
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
        self.operands = operands(q, k, v, call)
        self.device = q.device
        self.out_dtype = TORCH_DTYPES[self.operands.dtype]  # q's, or out_dtype for e4m3 inputs
        with _device_guard(q.device):
            self.plan = _args.make_plan(self.operands, call, _device_kind(q.device))
            self.plan.forward_bytes = self.plan.workspace_bytes()

    def __call__(self, q, k, v, text_len, return_lse: bool, scales=None):
        ops = operands(q, k, v, self.call, (0, 0, 0))
        if not ops.same_arrays(self.operands) or q.device != self.device:
            raise ValueError(f"q/k/v: shapes, strides, dtype or device differ from the ones this Plan was made for "
                             f"({self.device})")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return attention(q, k, v, self.call, text_len, True, None, scales)
        tl, values = _text_len_args(text_len, q, self.operands)
        given = _scale_tensors(scales, q, ops)
        with _device_guard(q.device):
            o, lse = _forward(self.plan, q, k, v, tl, values, self.call.layout, self.out_dtype, given)
        return o, (lse if return_lse else None)


def quantize_fp8(q, k, v, call: _args.Call, text_len):
    """precision fp8's quantisation of q, k, v (docs/semantics.md §11.2), as the library does it inside an fp8 run:
    e4m3 q8, k8, v8 with q's, k's and v's strides, and (q_scale, k_scale, v_scale). On CUDA through a native plan
    (the pre-pass alone, without the FP8 forward's workspace)."""
    if q.dtype == E4M3:
        raise TypeError(f"q: dtype {q.dtype} is e4m3 already: expected {_expected_dtypes(q.device)} to quantise")
    if q.device.type == "cuda":  # a native plan there: it quantises without the FP8 forward's workspace
        call = call._replace(precision="native")
    ops = operands(q, k, v, call)
    tl, values = _text_len_args(text_len, q, ops)
    with _device_guard(q.device):
        plan = _plan_for(q, k, v, call)
        out = [torch.empty_strided(t.shape, t.stride(), dtype=E4M3, device=q.device) for t in (q, k, v)]
        scales = [torch.empty(shape, dtype=torch.float32, device=q.device)
                  for shape in _scale_shapes(plan, q, k, call.layout)]
        tl = _text_len_tensor(tl, values, q.device)
        plan.quantize_fp8(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(tl), [t.data_ptr() for t in out + scales],
                          _stream(q.device))
    return (*out, tuple(scales))


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
