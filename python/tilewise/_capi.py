"""ctypes binding of libtilewise's C ABI (include/tilewise/tilewise.h).

Binding through the C ABI means nothing here is compiled against Python or PyTorch: the same shared library
serves every Python version and framework. Structures mirror the C header field for field.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

I64 = ctypes.c_int64
I32 = ctypes.c_int32

DTYPES = {"f32": 0, "f64": 1, "bf16": 2, "f16": 3}
DEVICES = {"cpu": 0, "cuda": 1, "cuda_reference": 2}
TEXT_POSITIONS = {"last": 0, "first": 1}
ORDERS = {"raster": 0, "tiled": 1}
LAYOUTS = {"bshd": 0, "bhsd": 1}
PATTERNS = {"dense": 0, "sliding_tile": 1, "attention_tile": 2, "block_list": 3}
PRECISIONS = {"native": 0, "fp8": 1, "fp8_scaled": 2}


class Problem(ctypes.Structure):
    _fields_ = [
        ("batch", I64), ("q_heads", I64), ("kv_heads", I64), ("head_dim", I64),
        ("dtype", I32), ("text_position", I32), ("order", I32), ("layout", I32),
        ("latent", I64 * 3), ("tile", I64 * 3),
        ("text_capacity", I64), ("seq_len", I64), ("head_offset", I64),
        ("q_strides", I64 * 4), ("k_strides", I64 * 4), ("v_strides", I64 * 4), ("o_strides", I64 * 4),
        ("scale", ctypes.c_double), ("precision", I32), ("sm_margin", I64),
    ]


class Pattern(ctypes.Structure):
    _fields_ = [
        ("kind", I32), ("num_heads", I64),
        ("windows", ctypes.POINTER(I64)), ("global_frames", ctypes.POINTER(I64)), ("radius", ctypes.POINTER(I64)),
        ("block_offsets", ctypes.POINTER(I64)), ("num_block_offsets", I64),
        ("block_tiles", ctypes.POINTER(I32)), ("num_block_tiles", I64),
    ]


class Tensors(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("q", "k", "v", "o", "lse", "text_len", "q_scale", "k_scale", "v_scale")]


class Fp8Tensors(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "q_scale", "k_scale", "v_scale")]


class GradTensors(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("q", "k", "v", "o", "lse", "dout", "dlse", "dq", "dk", "dv", "text_len")]


def _pointers(struct, init, **pointers):
    """A struct of pointers (Tensors, Fp8Tensors, GradTensors) filled by its tw_*_init, then with `pointers` by
    field name (integers, 0 = NULL)."""
    s = struct()
    init(ctypes.byref(s))
    for name, ptr in pointers.items():
        setattr(s, name, ptr or None)
    return s


class TilewiseError(ValueError):
    """An invalid argument reported by libtilewise; `argument` names it."""

    def __init__(self, message: str, argument: str):
        super().__init__(message)
        self.argument = argument


def _find_library() -> str:
    env = os.environ.get("TILEWISE_LIBRARY")
    if env:
        return env
    here = Path(__file__).resolve().parent
    for candidate in (here / "libtilewise.so", here.parents[1] / "build" / "libtilewise.so"):
        if candidate.exists():
            return str(candidate)
    raise OSError("libtilewise.so not found: build it (make build) or set TILEWISE_LIBRARY")


_lib = None


def lib(path: str | None = None):
    """Loads (once) and returns the shared library with its signatures declared."""
    global _lib
    if _lib is None or path is not None:
        L = ctypes.CDLL(path or _find_library())
        L.tw_problem_init.argtypes = [ctypes.POINTER(Problem)]
        L.tw_pattern_init.argtypes = [ctypes.POINTER(Pattern)]
        L.tw_plan_create.argtypes = [ctypes.POINTER(Problem), ctypes.POINTER(Pattern), I32, ctypes.POINTER(ctypes.c_void_p)]
        L.tw_plan_run.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        L.tw_plan_flops.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
        L.tw_plan_density.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
        L.tw_plan_destroy.argtypes = [ctypes.c_void_p]
        L.tw_last_error.restype = ctypes.c_char_p
        L.tw_last_error_argument.restype = ctypes.c_char_p
        L.tw_cuda_available.restype = I32
        L.tw_version.restype = ctypes.c_char_p
        L.tw_tile.argtypes = [ctypes.POINTER(Problem), ctypes.c_void_p, ctypes.c_void_p]
        L.tw_untile.argtypes = [ctypes.POINTER(Problem), ctypes.c_void_p, ctypes.c_void_p]
        L.tw_plan_workspace_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64)]
        L.tw_plan_run_with_workspace.argtypes = [ctypes.c_void_p] * 9
        L.tw_grad_tensors_init.argtypes = [ctypes.POINTER(GradTensors)]
        L.tw_plan_backward_workspace_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64)]
        L.tw_plan_run_backward.argtypes = [ctypes.c_void_p, ctypes.POINTER(GradTensors), ctypes.c_void_p, I32,
                                           ctypes.c_void_p]
        dim3 = ctypes.POINTER(I64)
        L.tw_tile_grid.argtypes = [dim3, dim3, dim3]
        L.tw_effective_window.argtypes = [dim3, dim3, dim3, dim3]
        L.tw_plan_grid.argtypes = [ctypes.c_void_p, dim3]
        L.tw_plan_window.argtypes = [ctypes.c_void_p, I64, dim3]
        L.tw_device_supports.argtypes = [I32, I32, I64]
        L.tw_device_supports_precision.argtypes = [I32, I32, I64, I32]
        L.tw_tensors_init.argtypes = [ctypes.POINTER(Tensors)]
        L.tw_plan_run_tensors.argtypes = [ctypes.c_void_p, ctypes.POINTER(Tensors), ctypes.c_void_p, ctypes.c_void_p]
        L.tw_fp8_tensors_init.argtypes = [ctypes.POINTER(Fp8Tensors)]
        L.tw_plan_quantize_fp8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.POINTER(Fp8Tensors), ctypes.c_void_p]
        L.tw_plan_fp8_key_blocks.argtypes = [ctypes.c_void_p, ctypes.POINTER(I64), ctypes.POINTER(I64)]
        _lib = L
    return _lib


def check(status: int, L=None) -> None:
    """Raises the library's last error for a non-zero status; L: the library that returned it (default: lib())."""
    if status != 0:
        L = L or lib()
        message = L.tw_last_error().decode()
        argument = (L.tw_last_error_argument() or b"").decode()
        if status == 1:
            raise TilewiseError(message, argument)
        raise RuntimeError(message)


def _enum(table: dict, name: str, value) -> int:
    if value not in table:
        raise TilewiseError(f"invalid {name} = {value!r}: expected one of {', '.join(table)}", name)
    return table[value]


def make_problem(*, batch, q_heads, kv_heads, head_dim, dtype, latent, tile, text_capacity=0,
                 text_position="last", order="raster", layout="bshd", strides=None, scale=0.0,
                 head_offset=0, precision="native", sm_margin=0) -> Problem:
    """A tw_problem from keyword arguments; strides: {"q": (batch, seq, head, dim), ...} in elements."""
    p = Problem()
    lib().tw_problem_init(ctypes.byref(p))
    p.batch, p.q_heads, p.kv_heads, p.head_dim = batch, q_heads, kv_heads, head_dim
    p.dtype = _enum(DTYPES, "dtype", dtype)
    p.text_position = _enum(TEXT_POSITIONS, "text_position", text_position)
    p.order = _enum(ORDERS, "order", order)
    p.layout = _enum(LAYOUTS, "layout", layout)
    p.latent[:], p.tile[:] = list(latent), list(tile)
    p.text_capacity, p.scale, p.head_offset, p.sm_margin = text_capacity, scale, head_offset, sm_margin
    p.precision = _enum(PRECISIONS, "precision", precision)
    for name, st in (strides or {}).items():
        getattr(p, f"{name}_strides")[:] = list(st)
    return p


def _dim3(values) -> ctypes.Array:
    return (I64 * 3)(*values)


def tile_grid(latent, tile) -> tuple:
    """Tiles per axis, ceil(latent / tile), from the library (tw_tile_grid)."""
    out = _dim3((0, 0, 0))
    check(lib().tw_tile_grid(_dim3(latent), _dim3(tile), out))
    return tuple(out)


def effective_window(latent, tile, window) -> tuple:
    """The window as it acts on the grid of latent / tile: min(k, tiles) per axis (tw_effective_window)."""
    out = _dim3((0, 0, 0))
    check(lib().tw_effective_window(_dim3(latent), _dim3(tile), _dim3(window), out))
    return tuple(out)


_support: dict = {}


def device_support(device: str, dtype: str, head_dim: int, precision: str = "native"):
    """None when `device` runs `dtype` at `head_dim` and `precision` here, else the TilewiseError saying why
    (tw_device_supports_precision, which plans a one-tile problem: cached, one answer per process)."""
    key = (device, dtype, int(head_dim), precision)
    if key not in _support:
        try:
            check(lib().tw_device_supports_precision(_enum(DEVICES, "device", device), _enum(DTYPES, "dtype", dtype),
                                                     int(head_dim), _enum(PRECISIONS, "precision", precision)))
            _support[key] = None
        except TilewiseError as e:
            _support[key] = e
    return _support[key]


def cuda_available() -> bool:
    """Whether the library was built with CUDA and a GPU its Hopper kernel runs on (sm_90) is present."""
    return bool(lib().tw_cuda_available()) and device_support("cuda", "bf16", 128) is None


def reorder(problem: Problem, src: int, dst: int, to_tiled: bool) -> None:
    """Raster <-> tiled order of a contiguous [B, S, H, D] host buffer (pointers as integers)."""
    fn = lib().tw_tile if to_tiled else lib().tw_untile
    check(fn(ctypes.byref(problem), ctypes.c_void_p(src), ctypes.c_void_p(dst)))


class Plan:
    """A planned problem: create once (validates, uploads tables), then run() only launches."""

    def __init__(self, *, batch, q_heads, kv_heads, head_dim, dtype, latent, tile, text_capacity=0,
                 text_position="last", order="raster", layout="bshd", strides=None, scale=0.0, head_offset=0,
                 pattern="sliding_tile", windows=((3, 3, 3),), global_frames=(0,), radius=(0,),
                 block_offsets=None, block_tiles=None, device="cuda", precision="native", sm_margin=0):
        # The plan keeps the library that made it: a later lib(path) (benchmarks load variants) must not send its
        # calls, its error messages or its destruction to another copy.
        self._lib = L = lib()
        p = make_problem(batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                         latent=latent, tile=tile, text_capacity=text_capacity, text_position=text_position,
                         order=order, layout=layout, strides=strides, scale=scale, head_offset=head_offset,
                         precision=precision, sm_margin=sm_margin)
        self.seq_len = p.latent[0] * p.latent[1] * p.latent[2] + text_capacity
        pat = Pattern()
        L.tw_pattern_init(ctypes.byref(pat))
        pat.kind = _enum(PATTERNS, "pattern", pattern)
        # The tables below only need to live until tw_plan_create returns: the plan copies them.
        if pattern == "sliding_tile":
            flat = (I64 * (3 * len(windows)))(*[x for w in windows for x in w])
            pat.num_heads, pat.windows = len(windows), flat
        elif pattern == "attention_tile":
            g = (I64 * len(global_frames))(*global_frames)
            r = (I64 * len(radius))(*radius)
            pat.num_heads, pat.global_frames, pat.radius = len(global_frames), g, r
        elif pattern == "block_list":
            off = (I64 * len(block_offsets))(*block_offsets)
            til = (I32 * len(block_tiles))(*block_tiles)
            pat.block_offsets, pat.num_block_offsets = off, len(block_offsets)
            pat.block_tiles, pat.num_block_tiles = til, len(block_tiles)
        handle = ctypes.c_void_p()
        check(L.tw_plan_create(ctypes.byref(p), ctypes.byref(pat), _enum(DEVICES, "device", device),
                               ctypes.byref(handle)), L)
        self._handle = handle

    def _call(self, fn: str, *args) -> None:
        """self._lib.fn(plan, *args), raising its error."""
        check(getattr(self._lib, fn)(self._handle, *args), self._lib)

    def run(self, q, k, v, o, lse=0, text_len=0, stream=0, workspace=0, scales=None) -> None:
        """Pointers as integers (e.g. tensor.data_ptr()); 0 for absent lse / text_len / default stream, and for
        the plan's own workspace (then runs of this plan must not overlap on two streams). scales: (q_scale,
        k_scale, v_scale) pointers (precision fp8_scaled only), None for none."""
        if scales is None:  # the common call: no struct to fill
            self._call("tw_plan_run_with_workspace", q, k, v, o, lse or None, text_len or None, workspace or None,
                       stream or None)
            return
        q_scale, k_scale, v_scale = scales
        t = _pointers(Tensors, self._lib.tw_tensors_init, q=q, k=k, v=v, o=o, lse=lse, text_len=text_len,
                      q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)
        self._call("tw_plan_run_tensors", ctypes.byref(t), workspace or None, stream or None)

    def quantize_fp8(self, q, k, v, text_len, out, stream=None) -> None:
        """precision fp8's quantisation alone: q, k, v (pointers) in the plan's dtype -> out, (q8, k8, v8,
        q_scale, k_scale, v_scale) pointers (tw_plan_quantize_fp8), on `stream` (a cudaStream_t; None: the
        default stream)."""
        q8, k8, v8, q_scale, k_scale, v_scale = out
        o = _pointers(Fp8Tensors, self._lib.tw_fp8_tensors_init, q=q8, k=k8, v=v8, q_scale=q_scale, k_scale=k_scale,
                      v_scale=v_scale)
        self._call("tw_plan_quantize_fp8", q, k, v, text_len or None, ctypes.byref(o), stream or None)

    def fp8_key_blocks(self) -> int:
        """K quantisation blocks per (batch, kv head): k_scale's last dimension."""
        out = I64()
        self._call("tw_plan_fp8_key_blocks", ctypes.byref(out), None)
        return out.value

    def fp8_key_block_of_positions(self) -> list:
        """The key block of every sequence position."""
        count, blocks = I64(), (I64 * self.seq_len)()
        self._call("tw_plan_fp8_key_blocks", ctypes.byref(count), blocks)
        return list(blocks)

    def workspace_bytes(self) -> int:
        out = ctypes.c_uint64()
        self._call("tw_plan_workspace_size", ctypes.byref(out))
        return out.value

    def backward_workspace_bytes(self) -> int:
        out = ctypes.c_uint64()
        self._call("tw_plan_backward_workspace_size", ctypes.byref(out))
        return out.value

    def run_backward(self, *, q, k, v, o, lse, dout, dq, dk, dv, dlse=0, text_len=0, workspace=0,
                     deterministic=False, stream=0) -> None:
        """Gradients (pointers as integers): dq with q's strides, dk / dv with k's / v's; dout with o's."""
        t = _pointers(GradTensors, self._lib.tw_grad_tensors_init, q=q, k=k, v=v, o=o, lse=lse, dout=dout, dlse=dlse,
                      dq=dq, dk=dk, dv=dv, text_len=text_len)
        self._call("tw_plan_run_backward", ctypes.byref(t), workspace or None, int(bool(deterministic)), stream or None)

    def grid(self) -> tuple:
        out = _dim3((0, 0, 0))
        self._call("tw_plan_grid", out)
        return tuple(out)

    def window(self, head: int) -> tuple:
        """The effective window of local head `head` (sliding tile plans)."""
        out = _dim3((0, 0, 0))
        self._call("tw_plan_window", head, out)
        return tuple(out)

    def flops(self, text_len_host=None) -> float:
        out = ctypes.c_double()
        arr = None if text_len_host is None else (I32 * len(text_len_host))(*text_len_host)
        self._call("tw_plan_flops", arr, ctypes.byref(out))
        return out.value

    def density(self) -> float:
        out = ctypes.c_double()
        self._call("tw_plan_density", ctypes.byref(out))
        return out.value

    def __del__(self):
        if getattr(self, "_handle", None):
            self._lib.tw_plan_destroy(self._handle)
            self._handle = None
