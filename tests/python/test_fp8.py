"""precision="fp8" (docs/semantics.md §11) through the Python API: the CPU reference against an independent numpy
simulation of the spec (float64, with the spec's fp32 and e4m3 rounding points: tight), its accuracy against
unquantised float64 attention next to the bf16 path's, the e4m3 inputs with caller scales, the torch ops (fake
registration, opcheck, torch.compile) and the errors of every new argument."""
import numpy as np
import pytest

import tilewise
from spec_oracle import masks, oracle, sta_mask

torch = pytest.importorskip("torch")
from tilewise import _torch  # noqa: E402,F401  (registers the custom ops)


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print("seed", seed)
    return np.random.default_rng(seed)


# --- the spec, simulated in numpy ---------------------------------------------------------------------------------

def e4m3(x):
    """Round to e4m3 (3 mantissa bits, exponents down to -6, subnormal spacing 2^-9), to nearest even, saturating
    at +-448: from the format's definition, in float64 (np.round rounds half to even)."""
    x = np.asarray(x, np.float64)
    a = np.abs(x)
    exponent = np.maximum(np.floor(np.log2(np.where(a > 0, a, 1.0))), -6)
    spacing = 2.0 ** (exponent - 3)
    return np.copysign(np.minimum(np.round(a / spacing) * spacing, 448.0), x)


def f32(x):
    return np.asarray(x, np.float32)


def group_scales(amax):
    """(scale, inv) of groups with absolute maxima amax, in fp32; 1 for empty groups (§11.1)."""
    amax = f32(amax)
    safe = np.where(amax > 0, amax, f32(1))
    return (np.where(amax > 0, safe / f32(448), f32(1)).astype(np.float32),
            np.where(amax > 0, f32(448) / safe, f32(1)).astype(np.float32))


def key_blocks(latent, tile, L, text_first):
    """Block of every position (raster order): its tile, or num_tiles + text index // 128."""
    T, H, W = latent
    n = [-(-latent[a] // tile[a]) for a in range(3)]
    video = [((t // tile[0]) * n[1] + h // tile[1]) * n[2] + w // tile[2]
             for t in range(T) for h in range(H) for w in range(W)]
    text = [n[0] * n[1] * n[2] + i // 128 for i in range(L)]
    return np.array(text + video if text_first else video + text), n[0] * n[1] * n[2] + -(-L // 128)


def simulate(q, k, v, latent, tile, allowed_video, text_len, text_first=False, scale=None):
    """§11.2 and §11.4 on float inputs [B, S, H, D]: (o, lse, quantised) with quantised = (q~, k~, v~, q_scale,
    k_scale, v_scale) as the library should produce them."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    nv = latent[0] * latent[1] * latent[2]
    L = S - nv
    scale = scale or 1 / np.sqrt(D)
    block, n_blocks = key_blocks(latent, tile, L, text_first)
    is_text = np.arange(S) < L if text_first else np.arange(S) >= nv
    text_index = np.arange(S) - (0 if text_first else nv)
    q, k, v = f32(q), f32(k), f32(v)
    qs, inv = group_scales(np.abs(q).max(axis=3))                      # [B, S, Hq]
    qq = e4m3(f32(q * inv[..., None]))
    kq, vq = np.zeros(k.shape), np.zeros(v.shape)
    ks, vs = np.ones((B, Hk, n_blocks), np.float32), np.ones((B, Hk, D), np.float32)
    mu = np.zeros((B, Hk, D), np.float32)
    for b in range(B):
        valid = ~is_text | (text_index < (L if text_len is None else np.broadcast_to(text_len, (B,))[b]))
        for g in range(Hk):
            mu[b, g] = f32(k[b, valid, g].astype(np.float64).mean(axis=0))
            smooth = f32(k[b, :, g] - mu[b, g])
            amax = np.zeros(n_blocks, np.float32)
            np.maximum.at(amax, block[valid], np.abs(smooth[valid]).max(axis=1))
            ks[b, g], inv = group_scales(amax)
            kq[b, :, g] = e4m3(f32(smooth * inv[block][:, None]))
            vs[b, g], inv = group_scales(np.abs(v[b, valid, g]).max(axis=0))
            vq[b, :, g] = e4m3(f32(v[b, :, g] * inv))
    allowed = masks(B, S, Hq, latent, allowed_video, text_len, text_first)
    o, lse = np.zeros(q.shape), np.zeros((B, Hq, S))
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hk)
            t = scale * np.log2(np.e) * qs[b, :, h, None].astype(np.float64) * ks[b, g, block][None, :] \
                * (qq[b, :, h] @ kq[b, :, g].T)
            t[~allowed[b, h]] = -np.inf
            m = np.ceil(t.max(axis=1, keepdims=True))
            p = e4m3(448 * 2.0 ** (t - m))
            l = p.sum(axis=1, keepdims=True)
            o[b, :, h] = vs[b, g] * (p @ vq[b, :, g]) / l
            lse[b, h] = (np.log(2) * (m + np.log2(l / 448)))[:, 0] + scale * (q[b, :, h].astype(np.float64) @ mu[b, g])
    return o, lse, (qq, kq, vq, qs.transpose(0, 2, 1), ks, vs)


def qkv(rng, B, S, Hq, Hk, D, dtype=np.float32):
    return [rng.standard_normal((B, S, h, D)).astype(dtype) for h in (Hq, Hk, Hk)]


# --- the CPU reference against the simulation -------------------------------------------------------------------

@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("D", [64, 96, 128])
def test_sliding_tile_matches_the_simulation(rng, text_first, D):
    latent, tile, L = (3, 5, 6), (2, 2, 4), 7   # partial tiles on every axis
    q, k, v = qkv(rng, 2, 90 + L, 4, 2, D)       # GQA
    windows, text_len = [(1, 3, 1), (2, 2, 2), (3, 1, 2), (5, 5, 5)], [0, 5]
    o, lse = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=windows, text_len=text_len,
                                             text_position="first" if text_first else "last", return_lse=True,
                                             precision="fp8")
    ref, ref_lse, _ = simulate(q, k, v, latent, tile, sta_mask(latent, tile, windows), np.array(text_len), text_first)
    np.testing.assert_allclose(o, ref, rtol=2e-6, atol=2e-7)   # float32 output: its own rounding only
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-6, atol=2e-6)


def test_attention_tile_dense_and_block_list_match_the_simulation(rng):
    latent, tile = (4, 2, 3), (2, 1, 3)
    q, k, v = qkv(rng, 1, 24 + 3, 2, 1, 64, np.float64)
    g, r = [1, 0], [0, 1]
    frames = lambda h, a, b: a[0] < g[h] or b[0] < g[h] or abs(a[0] - b[0]) <= r[h]  # noqa: E731
    o = tilewise.attention_tile(q, k, v, latent=latent, tile=tile, global_frames=g, radius=r, text_len=2,
                                precision="fp8")
    np.testing.assert_allclose(o, simulate(q, k, v, latent, tile, frames, np.array([2]))[0], rtol=1e-9, atol=1e-12)
    o = tilewise.dense_attention(q, k, v, latent=latent, tile=tile, precision="fp8")
    np.testing.assert_allclose(o, simulate(q, k, v, latent, tile, lambda *_: True, None)[0], rtol=1e-9, atol=1e-12)
    lists = [[0, 1], [1, 2], [0, 2], [3]]
    offsets, tiles = [0, 2, 4, 6, 7], [t for lst in lists for t in lst]
    o = tilewise.block_sparse_attention(q, k, v, latent=latent, tile=tile, block_offsets=offsets, block_tiles=tiles,
                                        precision="fp8")
    index = lambda c: ((c[0] // 2) * 2 + c[1]) * 1 + c[2] // 3  # noqa: E731
    ref = simulate(q, k, v, latent, tile, lambda h, a, b: index(b) in lists[index(a)], None)[0]
    np.testing.assert_allclose(o, ref, rtol=1e-9, atol=1e-12)


def test_long_text_bf16_torch_and_quantize_fp8(rng):
    """Text over several 128-position key blocks with padding; bf16 torch tensors; quantize_fp8's tensors are the
    simulation's, value for value, and with them the e4m3 path gives fp8's output."""
    latent, tile, L = (2, 4, 4), (1, 2, 2), 300
    q, k, v = (torch.from_numpy(x).bfloat16() for x in qkv(rng, 2, 32 + L, 2, 1, 64))
    kw = dict(latent=latent, tile=tile, text_position="first", text_len=[131, 0])
    o, lse = tilewise.sliding_tile_attention(q, k, v, window=(1, 1, 2), precision="fp8", return_lse=True, **kw)
    x = [t.double().numpy() for t in (q, k, v)]
    ref, ref_lse, quantised = simulate(*x, latent, tile, sta_mask(latent, tile, [(1, 1, 2)]), np.array([131, 0]),
                                       True)
    assert o.dtype == torch.bfloat16
    np.testing.assert_allclose(o.double().numpy(), ref, rtol=2 ** -8, atol=1e-6)  # bf16: one rounding
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=2e-6, atol=2e-6)

    q8, k8, v8, scales = tilewise.quantize_fp8(q, k, v, **kw)
    assert q8.dtype == k8.dtype == v8.dtype == torch.float8_e4m3fn and q8.stride() == q.stride()
    for got, want in zip((q8, k8, v8, *scales), quantised):
        np.testing.assert_array_equal(got.float().numpy(), want)
    o8, lse8 = tilewise.sliding_tile_attention(q8, k8, v8, window=(1, 1, 2), precision="fp8", scales=scales,
                                               return_lse=True, **kw)
    assert torch.equal(o8, o)   # the LSE lacks the smoothing term: fp8_scaled cannot know the mean key
    assert not torch.equal(lse8, lse)
    o16 = tilewise.sliding_tile_attention(q8, k8, v8, window=(1, 1, 2), precision="fp8", scales=scales,
                                          out_dtype=torch.float16, **kw)
    assert o16.dtype == torch.float16
    np.testing.assert_allclose(o16.double().numpy(), ref, rtol=2 ** -11, atol=1e-6)


def test_e4m3_rounding_agrees_with_torch(rng):
    """The simulation's e4m3 and the library's (rows whose largest value is 448 are quantised with inv = 1) against
    torch's float8_e4m3fn cast, an independent implementation (in range, where it does not need saturation)."""
    x = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-4, 2, 20000)).astype(np.float32)
    x = np.clip(x, -440, 440)
    np.testing.assert_array_equal(e4m3(x), torch.from_numpy(x).to(torch.float8_e4m3fn).double().numpy())
    q = torch.from_numpy(x.reshape(1, 20, 1, 1000)).bfloat16()
    q[..., 0] = 448
    k = v = torch.ones(1, 20, 1, 1000, dtype=torch.bfloat16)
    q8 = tilewise.quantize_fp8(q, k, v, latent=(1, 4, 5), tile=(1, 2, 2))[0]
    assert torch.equal(q8.view(torch.uint8), q.to(torch.float8_e4m3fn).view(torch.uint8))


def test_plan_and_bhsd(rng):
    latent, tile = (2, 4, 4), (1, 2, 2)
    q, k, v = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in qkv(rng, 1, 37, 2, 2, 64))
    plan = tilewise.Plan(q, k, v, latent=latent, tile=tile, window=(1, 1, 1), layout="bhsd", precision="fp8")
    o = plan(q, k, v, text_len=3)
    ref = simulate(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), latent, tile, sta_mask(latent, tile, [(1, 1, 1)]),
                   np.array([3]))[0]
    np.testing.assert_allclose(o.transpose(0, 2, 1, 3), ref, rtol=2e-6, atol=2e-7)
    qt, kt, vt = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v))
    q8, k8, v8, scales = tilewise.quantize_fp8(qt, kt, vt, latent=latent, tile=tile, text_len=3)
    plan8 = tilewise.Plan(q8, k8, v8, latent=latent, tile=tile, window=(1, 1, 1), precision="fp8",
                          out_dtype=torch.float32)
    np.testing.assert_array_equal(plan8(q8, k8, v8, text_len=3, scales=scales).numpy(),
                                  o.transpose(0, 2, 1, 3))


def test_key_blocks_from_the_library():
    for text_first in (False, True):
        for L in (0, 5, 300):
            blocks = tilewise.fp8_key_blocks(latent=(3, 5, 6), tile=(2, 2, 4), text_capacity=L,
                                             text_position="first" if text_first else "last")
            assert blocks == list(key_blocks((3, 5, 6), (2, 2, 4), L, text_first)[0])


# --- accuracy ----------------------------------------------------------------------------------------------------

def dit_like(rng, B, S, H, D):
    """Heavy-tailed q, k (Student-t, 4 degrees of freedom) with 4 channels 20-50x larger, a mean key of norm ~ the
    keys', and scores scaled to a standard deviation of 2; Student-t values."""
    q, k, v = (rng.standard_t(4, (B, S, H, D)) for _ in range(3))
    channels = rng.choice(D, 4, replace=False)
    factor = rng.uniform(20, 50, 4)
    q[..., channels] *= factor
    k[..., channels] *= factor
    k += 3 * rng.standard_normal((1, 1, H, D))
    s = np.einsum("bihd,bjhd->bhij", q, k - k.mean(axis=1, keepdims=True)) / np.sqrt(D)
    return q * (2 / s.std()), k, v


@pytest.mark.parametrize("inputs", ["normal", "dit_like"])
def test_accuracy_against_float64(rng, inputs):
    """§11.5: FP8's relative L2 error against float64 attention on the same bf16 inputs, next to the bf16 path's.
    The issue hoped for 3x the bf16 error; e4m3 rounds 16x more coarsely than bf16, and this holds FP8 to what the
    spec promises instead (the ratio is printed)."""
    latent, tile, L = (4, 8, 8), (2, 4, 4), 16
    x = qkv(rng, 1, 256 + L, 2, 2, 128, np.float64) if inputs == "normal" else dit_like(rng, 1, 256 + L, 2, 128)
    q, k, v = (torch.from_numpy(a).bfloat16() for a in x)
    kw = dict(latent=latent, tile=tile, window=(3, 3, 3), text_len=12)
    exact = oracle(*(t.double().numpy() for t in (q, k, v)), latent, tile, sta_mask(latent, tile, [(3, 3, 3)]),
                   np.array([12]))[0]
    err = {p: np.linalg.norm(tilewise.sliding_tile_attention(q, k, v, precision=p, **kw).double().numpy() - exact)
           / np.linalg.norm(exact) for p in ("native", "fp8")}
    print(f"{inputs}: rel L2 fp8 {err['fp8']:.4f}, bf16 {err['native']:.5f}, ratio {err['fp8'] / err['native']:.1f}")
    assert err["fp8"] <= 0.12
    assert err["native"] < err["fp8"]


def test_e4m3_queries_and_keys_alone_are_far_from_bf16(rng):
    """§11.5's floor: with only q and k rounded to e4m3 (scaled per row, finer than the spec's key blocks) and
    everything else exact in float64, the error is already over 10x the bf16 path's, so no e4m3 kernel can reach a
    small multiple of bf16's error; the FP8 path's own error is at most 2x this floor (P and V add the rest)."""
    latent, tile, L = (4, 8, 8), (2, 4, 4), 16
    q, k, v = (torch.from_numpy(a).bfloat16() for a in qkv(rng, 1, 256 + L, 2, 2, 128, np.float64))
    kw = dict(latent=latent, tile=tile, window=(3, 3, 3), text_len=12)
    mask, text_len = sta_mask(latent, tile, [(3, 3, 3)]), np.array([12])
    qd, kd, vd = (t.double().numpy() for t in (q, k, v))
    exact = oracle(qd, kd, vd, latent, tile, mask, text_len)[0]

    def rounded(x):
        scale = np.abs(x).max(axis=-1, keepdims=True) / 448
        return e4m3(x / scale) * scale

    def rel(o):
        return np.linalg.norm(o - exact) / np.linalg.norm(exact)

    floor = rel(oracle(rounded(qd), rounded(kd - kd.mean(axis=1, keepdims=True)), vd, latent, tile, mask,
                       text_len)[0])
    bf16 = rel(tilewise.sliding_tile_attention(q, k, v, **kw).double().numpy())
    fp8 = rel(tilewise.sliding_tile_attention(q, k, v, precision="fp8", **kw).double().numpy())
    print(f"rel L2: e4m3 q, k alone {floor:.4f}, fp8 {fp8:.4f}, bf16 {bf16:.5f}")
    assert floor > 10 * bf16
    assert floor < fp8 < 2 * floor


# --- the torch ops -----------------------------------------------------------------------------------------------

def test_ops_opcheck_and_compile(rng):
    q, k, v = (torch.from_numpy(x) for x in qkv(rng, 2, 38, 2, 1, 16))
    args = (q, k, v, None, [2, 5], [2, 4, 4], [1, 2, 2], "sliding_tile", [1, 2, 1], [], [], [], [], "last", "raster",
            "bshd", 0.0, 0, False, "fp8")
    torch.library.opcheck(torch.ops.tilewise.attention_fwd.default, args)
    q8, k8, v8, scales = tilewise.quantize_fp8(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), text_len=[2, 5])
    # test_schema compares the inputs before and after with ops that float8 CPU tensors lack: the other checks.
    torch.library.opcheck(torch.ops.tilewise.attention_fwd_fp8_scaled.default,
                          (q8, k8, v8, *scales) + args[3:18] + ("f16",),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))

    def f(q, k, v):
        return tilewise.sliding_tile_attention(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 2, 1),
                                               text_len=[2, 5], precision="fp8") * 2
    explain = torch._dynamo.explain(f)(q, k, v)
    assert explain.graph_break_count == 0
    assert torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v), f(q, k, v))


# --- errors ------------------------------------------------------------------------------------------------------

def test_errors(rng):
    latent, tile = (2, 4, 4), (1, 2, 2)
    kw = dict(latent=latent, tile=tile, window=(1, 1, 1))
    q, k, v = qkv(rng, 1, 37, 2, 1, 16)
    with pytest.raises(ValueError, match=r"invalid precision = 'fp4': expected one of 'native', 'fp8'"):
        tilewise.sliding_tile_attention(q, k, v, precision="fp4", **kw)
    with pytest.raises(TypeError, match="out_dtype: numpy arrays have no e4m3 dtype"):
        tilewise.sliding_tile_attention(q, k, v, precision="fp8", out_dtype="f16", **kw)
    with pytest.raises(TypeError, match="scales: expected None for numpy arrays"):
        tilewise.sliding_tile_attention(q, k, v, precision="fp8", scales=(1, 2, 3), **kw)
    with pytest.raises(TypeError, match="q: expected a torch tensor, got ndarray"):
        tilewise.quantize_fp8(q, k, v, latent=latent, tile=tile)

    qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))
    q8, k8, v8, scales = tilewise.quantize_fp8(qt, kt, vt, latent=latent, tile=tile)
    with pytest.raises(TypeError, match=r"q: dtype torch.float8_e4m3fn .* needs precision='fp8' and scales"):
        tilewise.sliding_tile_attention(q8, k8, v8, scales=scales, **kw)
    with pytest.raises(TypeError, match=r"scales: expected \(q_scale, k_scale, v_scale\)"):
        tilewise.sliding_tile_attention(q8, k8, v8, precision="fp8", **kw)
    with pytest.raises(TypeError, match="k_scale: expected a float32 tensor, got torch.float64"):
        tilewise.sliding_tile_attention(q8, k8, v8, precision="fp8", scales=(scales[0], scales[1].double(), scales[2]),
                                        **kw)
    with pytest.raises(ValueError, match=r"invalid v_scale with shape \(1, 1, 15\): expected a contiguous float32 "
                                         r"tensor \[1, 1, 16\]"):
        tilewise.sliding_tile_attention(q8, k8, v8, precision="fp8", scales=(*scales[:2], scales[2][..., 1:]), **kw)
    with pytest.raises(ValueError, match=r"invalid k_scale with shape \(1, 1, 7\): expected .* \[1, 1, 9\]"):
        tilewise.sliding_tile_attention(q8, k8, v8, precision="fp8", scales=(scales[0], torch.ones(1, 1, 7),
                                                                             scales[2]), **kw)
    bad = scales[1].clone()
    bad[0, 0, 2] = -1
    with pytest.raises(ValueError, match=r"invalid k_scale\[0, 0, 2\] = -1: expected a finite number > 0"):
        tilewise.sliding_tile_attention(q8, k8, v8, precision="fp8", scales=(scales[0], bad, scales[2]), **kw)
    with pytest.raises(ValueError, match="scales: expected None: scales come with e4m3 inputs"):
        tilewise.sliding_tile_attention(qt, kt, vt, precision="fp8", scales=scales, **kw)
    with pytest.raises(ValueError, match="invalid out_dtype = 'f16': expected None"):
        tilewise.sliding_tile_attention(qt, kt, vt, precision="fp8", out_dtype=torch.float16, **kw)
    with pytest.raises(TypeError, match="out_dtype: expected None or one of"):
        tilewise.sliding_tile_attention(q8, k8, v8, precision="fp8", scales=scales, out_dtype=torch.int32, **kw)
    with pytest.raises(TypeError, match=r"out_dtype: expected None or one of .*, got \['bf16'\]"):
        tilewise.sliding_tile_attention(q8, k8, v8, precision="fp8", scales=scales, out_dtype=["bf16"], **kw)
    with pytest.raises(TypeError, match="q: dtype torch.float8_e4m3fn is e4m3 already"):
        tilewise.quantize_fp8(q8, k8, v8, latent=latent, tile=tile)
    with pytest.raises(ValueError, match="precision: 'fp8' is forward only"):
        tilewise.sliding_tile_attention(qt.requires_grad_(), kt, vt, precision="fp8", **kw)
    qt.requires_grad_(False)
    o, lse = torch.ops.tilewise.attention_fwd(qt, kt, vt, None, [], list(latent), list(tile), "sliding_tile",
                                              [1, 1, 1], [], [], [], [], "last", "raster", "bshd", 0.0, 0, False,
                                              "fp8")
    with pytest.raises(tilewise.TilewiseError, match="invalid backward = precision fp8: expected a plan with "
                                                     "precision native"):
        torch.ops.tilewise.attention_bwd(o, None, qt, kt, vt, o, lse, None, [], list(latent), list(tile),
                                         "sliding_tile", [1, 1, 1], [], [], [], [], "last", "raster", "bshd", 0.0, 0,
                                         False, "fp8")
    with pytest.raises(ValueError, match="invalid precision = 'fp16'"):
        tilewise.supports("cpu", "bf16", 64, "fp16")
    assert tilewise.supports("cpu", "bf16", 64, "fp8")
    assert tilewise.supports("cuda", "bf16", 128, "fp8") == tilewise.cuda_available()  # the Hopper FP8 kernel


@pytest.mark.skipif(not tilewise.cuda_available(), reason="needs the Hopper backend")
@pytest.mark.parametrize("text_position,head_dim", [("first", 64), ("last", 128)])
def test_cuda_quantize_fp8_is_the_simulation_code_for_code(rng, text_position, head_dim):
    """quantize_fp8 on CUDA tensors runs on the GPU (fp8_quantize.cu) and gives the simulation's codes and scales:
    keys with a large mean, text over three 128-position blocks with padding, GQA, text_len as a device tensor,
    q in bhsd-like strides (a transposed view)."""
    latent, tile, L = (3, 5, 6), (2, 2, 4), 300
    q, k, v = (torch.from_numpy(x).bfloat16() for x in qkv(rng, 2, 90 + L, 4, 2, head_dim))
    k = k + torch.from_numpy(rng.standard_normal(head_dim) * 4).bfloat16()
    lens = [L, 129]
    kw = dict(latent=latent, tile=tile, text_position=text_position)
    cuda = [t.cuda() for t in (q, k, v)]
    cuda[0] = cuda[0].transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    got = tilewise.quantize_fp8(*cuda, text_len=torch.tensor(lens, device="cuda"), **kw)
    torch.cuda.synchronize()
    x = [t.double().numpy() for t in (q, k, v)]
    _, _, quantised = simulate(*x, latent, tile, sta_mask(latent, tile, [(1, 1, 1)]), np.array(lens),
                               text_position == "first")
    assert got[0].stride() == cuda[0].stride() and got[0].device.type == "cuda"
    for t, want in zip((*got[:3], *got[3]), quantised):
        np.testing.assert_array_equal(t.float().cpu().numpy(), want)


@pytest.mark.skipif(not tilewise.cuda_available(), reason="needs the Hopper backend")
@pytest.mark.parametrize("text_position,head_dim", [("first", 96), ("last", 128)])
def test_cuda_fp8_matches_the_cpu_reference(rng, text_position, head_dim):
    """precision="fp8" on CUDA tensors runs the Hopper FP8 kernel: its output within 1% (relative L2) of the CPU
    reference's FP8 arithmetic on the same inputs (GQA, padded text over several key blocks, a large mean key), its
    LSE within 1e-2 on 99% of the rows and 0.15 on all (fp32 accumulation order and exp2's last bits now and then
    move a weight across an e4m3 rounding step, as tests/test_cuda_fp8.cpp explains); and e4m3 inputs from
    quantize_fp8 with their scales give the same output on the GPU."""
    latent, tile, L = (4, 6, 10), (2, 4, 4), 200
    q, k, v = (torch.from_numpy(x).bfloat16() for x in qkv(rng, 2, 240 + L, 4, 2, head_dim))
    k = k + torch.from_numpy(rng.standard_normal(head_dim) * 3).bfloat16()
    lens = [L, 57]
    kw = dict(latent=latent, tile=tile, text_position=text_position, window=(1, 3, 2))
    o_cpu, lse_cpu = tilewise.sliding_tile_attention(q, k, v, text_len=lens, precision="fp8", return_lse=True, **kw)
    cuda = [t.cuda() for t in (q, k, v)]
    tl = torch.tensor(lens, device="cuda", dtype=torch.int32)
    o, lse = tilewise.sliding_tile_attention(*cuda, text_len=tl, precision="fp8", return_lse=True, **kw)
    err = (o.float().cpu() - o_cpu.float()).norm() / o_cpu.float().norm()
    assert err <= 1e-2, err
    finite = torch.isfinite(lse_cpu)
    assert torch.equal(finite, torch.isfinite(lse.cpu()))
    lse_err = (lse.cpu()[finite] - lse_cpu[finite]).abs() / lse_cpu[finite].abs().clamp(min=1)
    assert (lse_err > 1e-2).float().mean() <= 0.01 and lse_err.max() <= 0.15, lse_err.max()
    q8, k8, v8, scales = tilewise.quantize_fp8(*cuda, text_len=tl, latent=latent, tile=tile,
                                               text_position=text_position)
    o_scaled = tilewise.sliding_tile_attention(q8, k8, v8, text_len=tl, precision="fp8", scales=scales, **kw)
    assert torch.equal(o_scaled, o)


