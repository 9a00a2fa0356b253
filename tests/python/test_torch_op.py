"""The torch side of the API and the custom op torch.ops.tilewise.attention_fwd, against the float64 spec
oracle of spec_oracle.py (never the library itself).

CPU tests run everywhere torch is installed; the CUDA tests (Hopper kernel, bf16/f16, CUDA graphs, streams)
run on a machine with a Hopper GPU and skip elsewhere."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")

import tilewise  # noqa: E402
from tilewise import _torch  # noqa: E402
from spec_oracle import torch_oracle, torch_sta_video_mask  # noqa: E402

# torch.compile's inductor uses a deprecated torch.jit API internally (torch 2.11): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

HAS_CUDA = torch.cuda.is_available()
HOPPER = HAS_CUDA and torch.cuda.get_device_capability(0)[0] == 9
hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA Hopper GPU (sm_90) for the tilewise kernel")


@pytest.fixture
def gen():
    seed = int(np.random.SeedSequence().entropy % (1 << 62))
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def qkv(gen, B, S, Hq, Hk, D, dtype=torch.float32, device="cpu", layout="bshd"):
    """Fresh standard normals, as [B, S, H, D] or [B, H, S, D] tensors."""
    out = [randn(gen, B, S, h, D, dtype=dtype, device=device) for h in (Hq, Hk, Hk)]
    return out if layout == "bshd" else [x.transpose(1, 2).contiguous() for x in out]


def bshd(x, layout):
    return x if layout == "bshd" else x.transpose(1, 2)


def masks(latent, tile, windows):
    return [torch_sta_video_mask(latent, tile, w) for w in windows]


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# --- CPU ---

@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("text_first", [False, True])
def test_sliding_tile_per_head_windows_text_gqa(gen, layout, text_first):
    latent, tile, L = (3, 5, 6), (2, 2, 4), 7
    S = 3 * 5 * 6 + L
    q, k, v = qkv(gen, 2, S, 4, 2, 16, layout=layout)
    windows = [(1, 3, 1), (2, 2, 2), (3, 1, 2), (5, 5, 5)]
    text_len = torch.tensor([0, 5], dtype=torch.int32)
    o, lse = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=windows, text_len=text_len,
                                             text_position="first" if text_first else "last", layout=layout,
                                             return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous()
    assert lse.shape == (2, 4, S) and lse.dtype == torch.float32
    ref, ref_lse = torch_oracle(bshd(q, layout), bshd(k, layout), bshd(v, layout), latent,
                                masks(latent, tile, windows), [0, 5], text_first)
    torch.testing.assert_close(bshd(o, layout).double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
def test_cpu_dtypes(gen, dtype, tol):
    latent, tile = (2, 4, 6), (1, 2, 3)
    q, k, v = qkv(gen, 1, 48 + 5, 2, 2, 32, dtype=dtype)
    o = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=(1, 1, 2), text_len=3)
    assert o.dtype == dtype
    ref, _ = torch_oracle(q, k, v, latent, masks(latent, tile, [(1, 1, 2)]), [3])
    assert rel_l2(o, ref) <= tol


def test_text_len_forms_and_numpy_agree(gen):
    latent, tile = (2, 4, 4), (1, 2, 2)
    q, k, v = qkv(gen, 2, 32 + 6, 2, 1, 16)
    kw = dict(latent=latent, tile=tile, window=(1, 2, 1))
    ref, _ = torch_oracle(q, k, v, latent, masks(latent, tile, [(1, 2, 1)]), [4, 4])
    for text_len in (4, [4, 4], (4, 4), torch.tensor([4, 4]), torch.tensor([4, 4], dtype=torch.int32)):
        o = tilewise.sliding_tile_attention(q, k, v, text_len=text_len, **kw)
        torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)
    o_np = tilewise.sliding_tile_attention(q.numpy(), k.numpy(), v.numpy(), text_len=4, **kw)
    assert np.array_equal(o_np, tilewise.sliding_tile_attention(q, k, v, text_len=4, **kw).numpy())
    full, _ = torch_oracle(q, k, v, latent, masks(latent, tile, [(1, 2, 1)]), None)
    torch.testing.assert_close(tilewise.sliding_tile_attention(q, k, v, **kw).double(), full, rtol=1e-4, atol=1e-5)


def test_strided_views_of_a_fused_qkv_buffer(gen):
    latent, tile, B, S, H, D = (2, 3, 4), (1, 3, 2), 2, 24 + 3, 2, 16
    qkv_buf = randn(gen, B, S, 3, H, D)  # e.g. a fused projection, split without a copy
    q, k, v = qkv_buf.unbind(2)
    assert not q.is_contiguous()
    o = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=(1, 1, 1))
    assert o.is_contiguous()
    ref, _ = torch_oracle(q, k, v, latent, masks(latent, tile, [(1, 1, 1)]))
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)


def test_other_patterns(gen):
    latent, tile = (4, 2, 3), (1, 2, 3)
    q, k, v = qkv(gen, 1, 24 + 3, 2, 2, 8, dtype=torch.float64)
    o = tilewise.dense_attention(q, k, v, latent=latent, tile=tile, text_len=[2])
    ones = torch.ones(24, 24, dtype=torch.bool)
    torch.testing.assert_close(o, torch_oracle(q, k, v, latent, [ones], [2])[0])
    o = tilewise.attention_tile(q, k, v, latent=latent, tile=tile, global_frames=1, radius=1)
    frame = torch.arange(24) // 6
    m = (frame[:, None] < 1) | (frame[None, :] < 1) | ((frame[:, None] - frame[None, :]).abs() <= 1)
    torch.testing.assert_close(o, torch_oracle(q, k, v, latent, [m])[0])
    # Block list: tile t sees tiles {t, t+1 mod 4} (raster tile index = frame here).
    lists = [sorted({t, (t + 1) % 4}) for t in range(4)]
    offsets = [0, 2, 4, 6, 8]
    o = tilewise.block_sparse_attention(q, k, v, latent=latent, tile=tile, block_offsets=offsets,
                                        block_tiles=[x for lst in lists for x in lst])
    m = torch.tensor([[int(f) in lists[int(g)] for f in frame] for g in frame])
    torch.testing.assert_close(o, torch_oracle(q, k, v, latent, [m])[0])


def test_plan_on_tensors(gen):
    latent, tile = (2, 4, 4), (1, 2, 2)
    q, k, v = qkv(gen, 1, 36, 2, 2, 16)
    plan = tilewise.Plan(q, k, v, latent=latent, tile=tile, window=(1, 1, 1))
    a, lse = plan(q, k, v, text_len=torch.tensor([3]), return_lse=True)
    assert torch.equal(a, plan(q, k, v, text_len=[3]))
    ref, ref_lse = torch_oracle(q, k, v, latent, masks(latent, tile, [(1, 1, 1)]), [3])
    torch.testing.assert_close(a.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="differ from the ones this Plan"):
        plan(q[:, :35], k[:, :35], v[:, :35])
    with pytest.raises(TypeError, match="torch tensor"):
        plan(q.numpy(), k.numpy(), v.numpy())


def test_tile_untile(gen):
    x = randn(gen, 2, 4 * 4 * 6 + 3, 2, 8)
    t = tilewise.tile(x, latent=(4, 4, 6), tile=(2, 2, 3))
    assert np.array_equal(t.numpy(), tilewise.tile(x.numpy(), latent=(4, 4, 6), tile=(2, 2, 3)))
    assert torch.equal(tilewise.untile(t, latent=(4, 4, 6), tile=(2, 2, 3)), x)
    first = [x[:, (t_ * 4 + h) * 6 + w] for t_ in range(2) for h in range(2) for w in range(3)]
    assert torch.equal(t[:, :12], torch.stack(first, dim=1))


def _call(q, k, v, **kw):
    args = dict(latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1))
    args.update(kw)
    return tilewise.sliding_tile_attention(q, k, v, **args)


@pytest.mark.parametrize("call, exc, words", [
    (lambda q, k, v: _call(q, k.numpy(), v), TypeError, ["k", "torch tensor"]),
    (lambda q, k, v: _call(q.int(), k.int(), v.int()), TypeError, ["q", "torch.int32", "torch.float32"]),
    (lambda q, k, v: _call(q, k.double(), v), TypeError, ["k", "torch.float64", "differs"]),
    (lambda q, k, v: _call(q[0], k[0], v[0]), ValueError, ["q.ndim = 3", "4"]),
    (lambda q, k, v: _call(q, k[:, :, :1], v), ValueError, ["k/v"]),
    (lambda q, k, v: _call(q, k, v, latent=(3, 4, 4)), ValueError, ["latent", "sequence length"]),
    (lambda q, k, v: _call(q, k, v, layout="sbhd"), ValueError, ["layout", "bshd"]),
    (lambda q, k, v: _call(q, k, v, text_position="middle"), ValueError, ["text_position", "'first'"]),
    (lambda q, k, v: _call(q, k, v, window=(0, 1, 1)), ValueError, ["window", "0x1x1", ">= 1"]),
    (lambda q, k, v: _call(q, k, v, window=[(1, 1, 1)] * 3), ValueError, ["window", "3", "q_heads = 2"]),
    (lambda q, k, v: _call(q, k, v, text_len=9), ValueError, ["text_len[0] = 9", "capacity 4"]),
    (lambda q, k, v: _call(q, k, v, text_len=[1, 2]), ValueError, ["text_len", "2 values", "1 values"]),
    (lambda q, k, v: _call(q, k, v, text_len=torch.tensor([1, 2])), ValueError, ["text_len", "shape (2,)", "[1]"]),
    (lambda q, k, v: _call(q, k, v, text_len=torch.tensor([1.0])), TypeError, ["text_len", "integer tensor"]),
])
def test_errors_name_the_argument(gen, call, exc, words):
    _expect_error(gen, call, exc, words)


def _expect_error(gen, call, exc, words):
    """call(q, k, v) on small random tensors raises `exc` whose message holds every one of `words`."""
    q, k, v = qkv(gen, 1, 36, 2, 2, 16)
    with pytest.raises(exc) as info:
        call(q, k, v)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_plan_cache(gen):
    tilewise.clear_plan_cache()
    q, k, v = qkv(gen, 1, 36, 2, 2, 16)
    _call(q, k, v)
    _call(q, k, v)
    _call(q + 1, k, v)  # same geometry: same plan
    assert _torch.plan_cache_size() == 1
    _call(q, k, v, window=(2, 2, 2))
    _call(q, k, v, window=(1, 1, 1), scale=0.5)
    _call(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)  # other strides
    assert _torch.plan_cache_size() == 4
    tilewise.clear_plan_cache()
    assert _torch.plan_cache_size() == 0


def _op_args(q, k, v, text_len, values, windows=(1, 2, 1), layout="bshd"):
    return (q, k, v, text_len, values, [2, 4, 4], [1, 2, 2], "sliding_tile", list(windows), [], [], [], [], "last",
            "raster", layout, 0.0, 0, False)


def test_sm_margin_changes_no_bit_and_keys_the_plan_cache(gen):
    """sm_margin (SMs the CUDA kernels leave free) changes no bit on the CPU, gradients included (the op passes
    it on to attention_bwd); the plan holds it, so each margin has its own cached plan. The op takes it last."""
    tilewise.clear_plan_cache()
    q, k, v = (t.requires_grad_() for t in qkv(gen, 2, 38, 2, 1, 16))
    runs = []
    for margin in (0, 8):
        o = _call(q, k, v, text_len=[2, 4], sm_margin=margin)
        runs.append((o, *torch.autograd.grad(o.square().sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert _torch.plan_cache_size() == 2
    torch.library.opcheck(torch.ops.tilewise.attention_fwd.default,
                          _op_args(q.detach(), k.detach(), v.detach(), None, [2, 4]) + ("native", 8))


def test_autocast_computes_in_the_autocast_dtype_like_sdpa(gen):
    """Under torch.autocast a model often hands attention float32 q and k (from its norms) beside a bf16 v;
    SDPA casts all three to the autocast dtype, and so does tilewise: the result (and its gradients) equal the
    call on the cast tensors, in bf16; gradients reach the float32 leaves in float32. Outside autocast the
    mixed dtypes are an error naming them."""
    q, k = (t.requires_grad_() for t in qkv(gen, 2, 38, 2, 1, 16)[:2])
    v = randn(gen, 2, 38, 1, 16, dtype=torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = _call(q, k, v, text_len=[2, 4])
    assert o.dtype == torch.bfloat16
    grads = torch.autograd.grad(o.float().square().sum(), (q, k, v))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.bfloat16]
    qb, kb = (t.detach().bfloat16().requires_grad_() for t in (q, k))
    vb = v.detach().requires_grad_()
    ob = _call(qb, kb, vb, text_len=[2, 4])
    assert torch.equal(o, ob)
    expected = torch.autograd.grad(ob.float().square().sum(), (qb, kb, vb))
    assert all(torch.equal(g.to(e.dtype), e) for g, e in zip(grads, expected))
    with pytest.raises(TypeError, match="torch.bfloat16"):
        _call(q, k, v)


@pytest.mark.parametrize("text", ["tensor", "values", "none"])
def test_opcheck_forward_cpu(gen, text):
    q, k, v = qkv(gen, 2, 38, 2, 1, 16)
    tl = torch.tensor([3, 6], dtype=torch.int32) if text == "tensor" else None
    values = [2, 5] if text == "values" else []
    torch.library.opcheck(torch.ops.tilewise.attention_fwd.default, _op_args(q, k, v, tl, values))


class _Block(torch.nn.Module):
    """A module calling tilewise between other ops, with per-head windows and a text_len tensor."""

    def __init__(self, latent, tile, windows):
        super().__init__()
        self.latent, self.tile, self.windows = latent, tile, windows

    def forward(self, q, k, v, text_len):
        o, lse = tilewise.sliding_tile_attention(q * 0.5, k, v, latent=self.latent, tile=self.tile,
                                                 window=self.windows, text_len=text_len, return_lse=True)
        return torch.nn.functional.silu(o) + lse.transpose(1, 2).unsqueeze(-1)


def test_torch_compile_fullgraph_no_graph_break(gen):
    latent, tile = (2, 4, 4), (1, 2, 2)
    block = _Block(latent, tile, [(1, 1, 1), (2, 2, 2)])
    q, k, v = qkv(gen, 2, 38, 2, 2, 16)
    tl = torch.tensor([6, 2], dtype=torch.int32)
    explanation = torch._dynamo.explain(block)(q, k, v, tl)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, tl), block(q, k, v, tl))
    q2, k2, v2 = qkv(gen, 2, 38, 2, 2, 16)  # new values, same graph
    torch.testing.assert_close(compiled(q2, k2, v2, tl), block(q2, k2, v2, tl))


@pytest.mark.parametrize("call, exc, words", [
    (lambda q, k, v: _call(q, k, v, window=torch.tensor([1.0, 1.0, 1.0])), TypeError, ["window[0]", "tensor(1."]),
    (lambda q, k, v: _call(q, k, v, latent=(torch.tensor(2.0), 4, 4)), TypeError, ["latent[0]"]),
    (lambda q, k, v: _call(q, k, v, text_len=torch.tensor([2.5])), TypeError, ["text_len", "integer tensor"]),
    (lambda q, k, v: _call(q, k, v, text_len=torch.tensor([1], device="meta")), ValueError,
     ["text_len: on device meta"]),
    (lambda q, k, v: _call(q.to("meta"), k.to("meta"), v.to("meta")), ValueError, ["q: on device meta"]),
    (lambda q, k, v: _call(q, k.to("meta"), v), ValueError, ["k: on device meta", "q's device cpu"]),
    (lambda q, k, v: _call(q, k, v, window=(True, 1, 1)), TypeError, ["window[0]", "True"]),
    (lambda q, k, v: _call(q, k, v, order="tiled", tile=(1, 3, 2)), ValueError, ["order"]),
])
def test_torch_argument_checks(gen, call, exc, words):
    _expect_error(gen, call, exc, words)


def test_integer_tensors_are_integers(gen):
    q, k, v = qkv(gen, 1, 36, 2, 2, 16)
    ref, _ = torch_oracle(q, k, v, (2, 4, 4), masks((2, 4, 4), (1, 2, 2), [(1, 2, 1)]), [3])
    o = _call(q, k, v, latent=torch.tensor([2, 4, 4]), window=torch.tensor([1, 2, 1]), text_len=[torch.tensor(3)],
              head_offset=torch.tensor(0))
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)
    o = _call(q, k, v, window="1x2x1", text_len=torch.tensor([3], dtype=torch.int16))
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)


def test_tiled_order_and_head_offset_on_tensors(gen):
    latent, tile = (2, 4, 6), (1, 2, 3)
    q, k, v = qkv(gen, 2, 48 + 4, 2, 1, 16)
    table = [(1, 1, 1), (2, 2, 2), (1, 2, 1), (2, 1, 2)]
    ref, _ = torch_oracle(q, k, v, latent, masks(latent, tile, table[2:]), [4, 1])
    tq, tk, tv = (tilewise.tile(x, latent=latent, tile=tile) for x in (q, k, v))
    o = tilewise.sliding_tile_attention(tq, tk, tv, latent=latent, tile=tile, window=table, head_offset=2,
                                        order="tiled", text_len=[4, 1])
    torch.testing.assert_close(tilewise.untile(o, latent=latent, tile=tile).double(), ref, rtol=1e-4, atol=1e-5)


def test_import_tilewise_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "import numpy as np, tilewise\n"
            "q = np.random.randn(1, 36, 2, 16).astype(np.float32)\n"
            "o = tilewise.sliding_tile_attention(q, q, q, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1))\n"
            "assert o.shape == q.shape and sys.modules['torch'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


# --- CUDA (Hopper) ---

CUDA_CASES = [  # (latent, tile, Hq, Hk, D, L, text_len, windows)
    ((3, 9, 20), (2, 4, 8), 4, 2, 128, 37, [20, 0], [(1, 1, 1), (2, 1, 2), (1, 3, 1), (3, 3, 3)]),
    ((4, 8, 16), (2, 4, 8), 2, 2, 64, 16, [16, 5], [(1, 2, 1)]),
    ((2, 8, 8), (1, 8, 8), 3, 1, 96, 8, [3, 8], [(1, 1, 1), (2, 1, 1), (1, 1, 1)]),
]


@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("case", range(len(CUDA_CASES)))
def test_cuda_matches_oracle(gen, dtype, text_first, layout, case):
    latent, tile, Hq, Hk, D, L, text_len, windows = CUDA_CASES[case]
    S = latent[0] * latent[1] * latent[2] + L
    q, k, v = qkv(gen, 2, S, Hq, Hk, D, dtype=dtype, device="cuda", layout=layout)
    tl = torch.tensor(text_len, dtype=torch.int32, device="cuda")
    o, lse = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=windows, text_len=tl,
                                             text_position="first" if text_first else "last", layout=layout,
                                             return_lse=True)
    assert o.device == q.device and o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
    ref, ref_lse = torch_oracle(bshd(q, layout), bshd(k, layout), bshd(v, layout), latent,
                                masks(latent, tile, windows), text_len, text_first)
    out = bshd(o, layout)
    assert not out.isnan().any()
    assert rel_l2(out, ref) <= 1e-2
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-3, atol=2e-2)


def _cuda_problem(gen, B=2):
    latent, tile, windows = (4, 8, 16), (2, 4, 8), [(1, 1, 1), (2, 2, 1)]
    S = 4 * 8 * 16 + 16
    q, k, v = qkv(gen, B, S, 2, 2, 128, dtype=torch.bfloat16, device="cuda")
    return q, k, v, dict(latent=latent, tile=tile, window=windows)


@hopper
def test_cuda_graph_capture_and_replay_equal_eager(gen):
    q, k, v, kw = _cuda_problem(gen)
    tl = torch.tensor([16, 3], dtype=torch.int32, device="cuda")
    static = [x.clone() for x in (q, k, v)]
    tilewise.sliding_tile_attention(*static, text_len=tl, **kw)  # eager warm-up: creates the plan
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tilewise.sliding_tile_attention(*static, text_len=tl, **kw)
    for _ in range(2):  # new inputs and new text lengths, read on the device at replay
        fresh = qkv(gen, 2, q.shape[1], 2, 2, 128, dtype=torch.bfloat16, device="cuda")
        for s, f in zip(static, fresh):
            s.copy_(f)
        tl.copy_(torch.randint(0, 17, (2,), generator=gen).to(torch.int32))
        graph.replay()
        eager = tilewise.sliding_tile_attention(*fresh, text_len=tl.clone(), **kw)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@hopper
def test_cuda_runs_on_the_current_stream(gen):
    q, k, v, kw = _cuda_problem(gen, B=1)
    expected = tilewise.sliding_tile_attention(q, k, v, **kw)
    tilewise.clear_plan_cache()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    q_late = torch.zeros_like(q)
    with torch.cuda.stream(side):
        tilewise.sliding_tile_attention(q_late, k, v, **kw)  # creates the side stream's plan (host work)
        torch.cuda._sleep(200_000_000)  # keeps `side` busy: a launch on another stream would read zeros
        q_late.copy_(q)
        o = tilewise.sliding_tile_attention(q_late, k, v, **kw)
    side.synchronize()
    assert torch.equal(o, expected)
    assert _torch.plan_cache_size() == 1
    tilewise.sliding_tile_attention(q, k, v, **kw)  # the same plan on the default stream (own workspace per run)
    assert _torch.plan_cache_size() == 1


@hopper
def test_cuda_one_plan_on_two_streams_at_once(gen):
    q, k, v, kw = _cuda_problem(gen, B=1)
    q2 = qkv(gen, 1, q.shape[1], 2, 2, 128, dtype=torch.bfloat16, device="cuda")[0]
    expected = [tilewise.sliding_tile_attention(x, k, v, **kw) for x in (q, q2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = []
    for s_, x in zip(streams, (q, q2)):
        s_.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s_):
            outs.append(tilewise.sliding_tile_attention(x, k, v, **kw))
    torch.cuda.synchronize()
    assert _torch.plan_cache_size() == 1
    assert all(torch.equal(a, b) for a, b in zip(outs, expected))


@hopper
def test_opcheck_forward_cuda(gen):
    q, k, v = qkv(gen, 2, 2 * 4 * 4 + 6, 2, 1, 64, dtype=torch.bfloat16, device="cuda")
    tl = torch.tensor([3, 6], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.tilewise.attention_fwd.default, _op_args(q, k, v, tl, []))
    torch.library.opcheck(torch.ops.tilewise.attention_fwd.default, _op_args(q, k, v, None, [1, 2]))


def _cuda_block(gen):
    """_cuda_problem as a small model block with per-batch text lengths, for the torch.compile tests."""
    q, k, v, kw = _cuda_problem(gen)
    block = _Block(kw["latent"], kw["tile"], kw["window"])
    tl = torch.tensor([16, 7], dtype=torch.int32, device="cuda")
    torch._dynamo.reset()
    return q, k, v, block, tl


@hopper
def test_cuda_torch_compile_fullgraph(gen):
    q, k, v, block, tl = _cuda_block(gen)
    compiled = torch.compile(block, fullgraph=True)
    # inductor may compute the bf16 silu in float32: compare at bf16 precision.
    assert rel_l2(compiled(q, k, v, tl), block(q, k, v, tl)) < 1e-2


@hopper
def test_cuda_torch_compile_reduce_overhead_cuda_graphs(gen):
    q, _, _, block, tl = _cuda_block(gen)
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)  # cudagraph trees
    for _ in range(4):  # warm-up, recording, then replays with new inputs
        q2, k2, v2 = qkv(gen, 2, q.shape[1], 2, 2, 128, dtype=torch.bfloat16, device="cuda")
        out = compiled(q2, k2, v2, tl).clone()
        assert rel_l2(out, block(q2, k2, v2, tl)) < 1e-2


@hopper
def test_cuda_errors(gen):
    q, k, v, kw = _cuda_problem(gen, B=1)
    with pytest.raises(TypeError, match="bfloat16 or torch.float16 on CUDA"):
        tilewise.sliding_tile_attention(q.float(), k.float(), v.float(), **kw)
    with pytest.raises(ValueError, match="head_dim"):
        tilewise.sliding_tile_attention(q[..., :80], k[..., :80], v[..., :80], **kw)
    assert tilewise.cuda_available() and tilewise.supports("cuda", "f16", 96) and not tilewise.supports("cuda", "f32", 64)
    with pytest.raises(ValueError, match="text_len: on device cpu"):
        tilewise.sliding_tile_attention(q, k, v, text_len=torch.tensor([3]), **kw)
    with pytest.raises(ValueError, match="k: on device cpu"):
        tilewise.sliding_tile_attention(q, k.cpu(), v, **kw)
