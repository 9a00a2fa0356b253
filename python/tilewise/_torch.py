"""PyTorch support: the custom op `torch.ops.tilewise.attention_fwd` and the torch side of the public functions.

Loaded by `tilewise._api` when a torch tensor is first seen (or by `import tilewise` when torch is already
imported), so that `import tilewise` never needs torch.

- The public functions (`tilewise.sliding_tile_attention`, ...) check shapes and types with the same code as
  for numpy (`_api._Geometry`, `_api._pattern_params`, `_api._text_len_values`) and call the custom op with
  every pattern parameter as an op argument, so `torch.compile(fullgraph=True)` traces them without a graph
  break (the fake implementation gives the output shapes).
- The op's implementation looks its plan up in a cache keyed by everything a plan depends on (shapes,
  strides, dtype, device, latent, tile, pattern and parameters, text position, layout, scale) and by the CUDA
  stream (a plan's scheduler counter is reset on the stream it runs on, so one plan must not run on two
  streams at once). On a hit it only allocates the outputs (torch allocator) and launches on the current
  stream: no host sync, so CUDA graphs capture and replay it after one eager warm-up call. Plans cannot be
  created while capturing, so a capture (which runs on a capture stream of its own) reuses the plan made by
  the warm-up; a replayed graph must then not run concurrently with eager calls of the same geometry on
  another stream.
- Backward is not implemented: autograd raises NotImplementedError when a gradient is needed.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from tilewise import _api, _capi

_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _expected_dtypes(cuda: bool) -> str:
    return "torch.bfloat16 or torch.float16 on CUDA" if cuda else \
        "torch.float32, torch.float64, torch.float16 or torch.bfloat16 on the CPU"


def _view(t: torch.Tensor, cuda: bool) -> _api._View:
    dtype = _DTYPES.get(t.dtype)
    if cuda and t.dtype not in _CUDA_DTYPES:
        dtype = None
    return _api._View(tuple(t.shape), tuple(t.stride()), dtype, str(t.dtype))


def geometry(q, k, v, latent, layout: str):
    """(_api._Geometry, device string) of three tensors on one CPU or CUDA device."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor like q, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name}: on device {t.device}, expected q's device {q.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q: on device {q.device}, expected a CPU or CUDA tensor")
    cuda = q.device.type == "cuda"
    g = _api._Geometry.of(_view(q, cuda), _view(k, cuda), _view(v, cuda), latent, layout, _expected_dtypes(cuda))
    return g, str(q.device)


def _text_len_args(text_len, q: torch.Tensor, g: _api._Geometry):
    """-> (tensor or None, host values or []): a tensor stays on the device (no host read); ints are checked."""
    if text_len is None:
        return None, []
    if isinstance(text_len, torch.Tensor):
        if tuple(text_len.shape) != (g.batch,):
            raise ValueError(f"invalid text_len with shape {tuple(text_len.shape)}: expected a tensor [{g.batch}] "
                             "(one length per batch element)")
        if text_len.dtype not in _INT_DTYPES:
            raise TypeError(f"text_len: dtype {text_len.dtype} is not supported: expected an integer tensor "
                            "(torch.int32 is used as is)")
        if text_len.device != q.device:
            raise ValueError(f"text_len: on device {text_len.device}, expected q's device {q.device} (it is read "
                             "where the kernel runs, without a host sync)")
        return text_len, []
    return None, list(_api._text_len_values(text_len, g.batch, g.text_capacity))


def attention(q, k, v, *, latent, tile, params: _api._PatternParams, text_len, text_position, layout, scale,
              return_lse):
    """The torch side of the public functions: checks, then the custom op."""
    latent, tile = _api._triple("latent", latent), _api._triple("tile", tile)
    g, _ = geometry(q, k, v, latent, layout)
    if text_position not in _capi.TEXT_POSITIONS:
        raise ValueError(f"invalid text_position = {text_position!r}: expected 'last' or 'first'")
    tl, tl_values = _text_len_args(text_len, q, g)
    o, lse = attention_fwd(q, k, v, tl, tl_values, list(latent), list(tile), params.pattern,
                           [x for w in params.windows for x in w], list(params.global_frames), list(params.radius),
                           list(params.block_offsets), list(params.block_tiles), text_position, layout,
                           float(scale or 0.0), bool(return_lse))
    return (o, lse) if return_lse else o


# --- plan cache ---

_plans: dict = {}        # (problem, stream) -> plan
_first_plans: dict = {}  # problem -> the first plan made for it (used while capturing a CUDA graph)
_text_lens: dict = {}


def clear_plan_cache() -> None:
    """Drops every cached plan and text-length tensor (plans are rebuilt on the next call, outside capture)."""
    _plans.clear()
    _first_plans.clear()
    _text_lens.clear()


def plan_cache_size() -> int:
    return len(_plans)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _text_len_ptr(text_len: Optional[torch.Tensor], values: List[int], device: torch.device):
    """Pointer to int32 lengths on `device` (0 = all valid), and the tensor that keeps it alive."""
    if text_len is not None:
        if text_len.dtype != torch.int32 or not text_len.is_contiguous():
            text_len = text_len.to(torch.int32).contiguous()  # on the device, stream-ordered
        return text_len.data_ptr(), text_len
    if not values:
        return 0, None
    key = (tuple(values), device)
    t = _text_lens.get(key)
    if t is None:
        if _capturing(device):
            raise RuntimeError(f"tilewise: text_len {list(values)} has no device copy yet during CUDA graph "
                               "capture: run the call once eagerly before capturing, or pass a device tensor")
        t = _text_lens[key] = torch.tensor(list(values), dtype=torch.int32, device=device)
    return t.data_ptr(), t


def _plan_for(q, k, v, latent, tile, params: _api._PatternParams, text_position, layout, scale, stream):
    problem = (tuple(q.shape), tuple(q.stride()), tuple(k.shape), tuple(k.stride()), tuple(v.shape),
               tuple(v.stride()), q.dtype, q.device, tuple(latent), tuple(tile), params, text_position, layout, scale)
    plan = _plans.get((problem, stream))
    if plan is None:
        if _capturing(q.device):
            # Creating a plan (host planning, table uploads) cannot be captured. Graphs are captured on their
            # own stream (torch.cuda.graph's private one, cudagraph trees' own), so reuse the plan that the
            # eager warm-up made on its stream; the graph then runs that plan wherever it is replayed.
            plan = _first_plans.get(problem)
            if plan is None:
                raise RuntimeError("tilewise: no plan for this call during CUDA graph capture (creating one does "
                                   "host planning and table uploads): run the same call once eagerly first")
            return plan
        g, _ = geometry(q, k, v, latent, layout)
        device = "cuda" if q.device.type == "cuda" else "cpu"
        plan = _plans[(problem, stream)] = _api._make_capi_plan(g, latent, tile, params, text_position, layout, scale,
                                                                device)
        _first_plans.setdefault(problem, plan)
    return plan


def _outputs(q: torch.Tensor, layout: str, return_lse: bool):
    B, H, S = (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else (q.shape[0], q.shape[1], q.shape[2])
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous in `layout`
    lse = torch.empty((B, H, S) if return_lse else (0,), dtype=torch.float32, device=q.device)
    return o, lse


def _run(plan: _capi.Plan, q, k, v, o, lse, return_lse, tl_ptr, stream):
    plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr() if return_lse else 0, tl_ptr,
             stream)


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else _NoGuard()


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.library.custom_op("tilewise::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: Optional[torch.Tensor],
                  text_len_values: List[int], latent: List[int], tile: List[int], pattern: str, windows: List[int],
                  global_frames: List[int], radius: List[int], block_offsets: List[int], block_tiles: List[int],
                  text_position: str, layout: str, scale: float, return_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tile-sparse attention forward. windows: flattened (kt, kh, kw) triples; text_len (device tensor) or
    text_len_values (host ints, [] = all valid). Returns o (contiguous in `layout`) and the float32 LSE
    [B, Hq, S] (an empty tensor when return_lse is False)."""
    params = _api._PatternParams(pattern, tuple(tuple(windows[i:i + 3]) for i in range(0, len(windows), 3)),
                                 tuple(global_frames), tuple(radius), tuple(block_offsets), tuple(block_tiles))
    with _device_guard(q.device):
        stream = _stream(q.device)
        plan = _plan_for(q, k, v, latent, tile, params, text_position, layout, scale, stream)
        o, lse = _outputs(q, layout, return_lse)
        tl_ptr, _keep = _text_len_ptr(text_len, text_len_values, q.device)
        _run(plan, q, k, v, o, lse, return_lse, tl_ptr, stream)
    return o, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, text_len, text_len_values, latent, tile, pattern, windows, global_frames, radius,
                        block_offsets, block_tiles, text_position, layout, scale, return_lse):
    B, H, S = (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else (q.shape[0], q.shape[1], q.shape[2])
    o = q.new_empty(q.shape)
    lse = q.new_empty((B, H, S) if return_lse else (0,), dtype=torch.float32)
    return o, lse


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_o, grad_lse):
    raise NotImplementedError("tilewise: the backward pass of tilewise attention (torch.ops.tilewise.attention_fwd) "
                              "is not implemented yet; tilewise is forward-only (run under torch.no_grad(), or "
                              "detach q, k and v)")


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- tilewise.Plan on tensors ---

def make_plan(q, k, v, latent, tile, params, text_position, layout, scale):
    """(geometry, device string, _capi.Plan) for tilewise.Plan on tensors (made on q's device)."""
    g, device = geometry(q, k, v, latent, layout)
    with _device_guard(q.device):
        plan = _api._make_capi_plan(g, latent, tile, params, text_position, layout, scale,
                                    "cuda" if q.device.type == "cuda" else "cpu")
    return g, device, plan


def run_plan(plan, q, k, v, text_len, return_lse):
    g, device = geometry(q, k, v, (0, 0, 0), plan._layout)
    if not g.same_problem(plan._geometry) or device != plan._device:
        raise ValueError(f"q/k/v: shapes, strides, dtype or device differ from the ones this Plan was made for "
                         f"({plan._device})")
    tl, tl_values = _text_len_args(text_len, q, plan._geometry)
    with _device_guard(q.device):
        stream = _stream(q.device)
        o, lse = _outputs(q, plan._layout, return_lse)
        tl_ptr, _keep = _text_len_ptr(tl, tl_values, q.device)
        _run(plan._plan, q, k, v, o, lse, return_lse, tl_ptr, stream)
    return o, (lse if return_lse else None)


# --- tile / untile ---

_permutations: dict = {}


def reorder(x: torch.Tensor, latent, tile, text_position, to_tiled: bool) -> torch.Tensor:
    """Raster <-> tiled order along dim 1 of a [B, S, ...] tensor: a gather by the permutation that the core's
    tw_tile / tw_untile apply to the positions 0..S-1 (so the order is defined in one place, the core)."""
    if x.dim() != 4:
        raise ValueError(f"invalid x with shape {tuple(x.shape)}: expected a [B, S, H, D] tensor")
    latent, tile = _api._triple("latent", latent), _api._triple("tile", tile)
    S = x.shape[1]
    key = (S, latent, tile, text_position, to_tiled, x.device)
    perm = _permutations.get(key)
    if perm is None:
        positions = np.arange(S, dtype=np.float64).reshape(1, S, 1, 1)  # exact up to 2^53
        order = _api._reorder(positions, latent, tile, text_position, to_tiled)[0, :, 0, 0]
        perm = _permutations[key] = torch.from_numpy(order.astype(np.int64)).to(x.device)
    return x.index_select(1, perm)
