"""The Python API on numpy arrays (CPU backend) against an independent oracle written from the spec
(spec_oracle.py: dense float64 attention whose mask is evaluated element by element from the spec's formulas)."""
import itertools

import numpy as np
import pytest

import tilewise
from spec_oracle import oracle, sta_mask


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print("seed", seed)
    return np.random.default_rng(seed)


def qkv(rng, B, S, Hq, Hk, D, dtype=np.float32):
    return [rng.standard_normal((B, S, h, D)).astype(dtype) for h in (Hq, Hk, Hk)]


@pytest.mark.parametrize("text_first", [False, True])
def test_sliding_tile_partial_tiles_text_gqa(rng, text_first):
    latent, tile, L = (3, 5, 6), (2, 2, 4), 7
    S = 3 * 5 * 6 + L
    q, k, v = qkv(rng, 2, S, 4, 2, 32)
    windows = [(1, 3, 1), (2, 2, 2), (3, 1, 2), (5, 5, 5)]
    text_len = [0, 5]
    o, lse = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=windows, text_len=text_len,
                                             text_position="first" if text_first else "last", return_lse=True)
    ref, ref_lse = oracle(*(x.astype(np.float64) for x in (q, k, v)), latent, tile, sta_mask(latent, tile, windows),
                          np.array(text_len), text_first)
    np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_bhsd_layout_and_float16(rng):
    latent, tile = (2, 4, 4), (1, 2, 2)
    q, k, v = (x.transpose(0, 2, 1, 3).copy() for x in qkv(rng, 1, 32, 2, 2, 16, np.float16))  # [B, H, S, D]
    o = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=(1, 1, 1), layout="bhsd")
    assert o.shape == q.shape and o.dtype == np.float16
    ref, _ = oracle(*(x.transpose(0, 2, 1, 3).astype(np.float64) for x in (q, k, v)), latent, tile,
                    sta_mask(latent, tile, [(1, 1, 1)]), None)
    np.testing.assert_allclose(o.transpose(0, 2, 1, 3), ref, rtol=1e-2, atol=2e-3)


def test_attention_tile_and_block_list(rng):
    latent, tile = (4, 2, 3), (2, 1, 3)
    q, k, v = qkv(rng, 1, 24 + 3, 2, 2, 8, np.float64)
    o = tilewise.attention_tile(q, k, v, latent=latent, tile=tile, global_frames=[1, 0], radius=[0, 1], text_len=2)
    g, r = [1, 0], [0, 1]
    ref, _ = oracle(q, k, v, latent, tile, lambda h, a, b: a[0] < g[h] or b[0] < g[h] or abs(a[0] - b[0]) <= r[h],
                    np.array([2]))
    np.testing.assert_allclose(o, ref, rtol=1e-10, atol=1e-12)

    n_tiles = 2 * 2 * 1
    lists = [sorted({t, (t + 1) % n_tiles}) for t in range(n_tiles)]
    offsets = [0] + list(itertools.accumulate(len(x) for x in lists))
    tiles = [x for lst in lists for x in lst]
    o = tilewise.block_sparse_attention(q, k, v, latent=latent, tile=tile, block_offsets=offsets, block_tiles=tiles)

    def tile_index(c):
        return ((c[0] // 2) * 2 + c[1] // 1) * 1 + c[2] // 3

    ref, _ = oracle(q, k, v, latent, tile, lambda h, a, b: tile_index(b) in lists[tile_index(a)], None)
    np.testing.assert_allclose(o, ref, rtol=1e-10, atol=1e-12)


def test_plan_reuse_and_flops(rng):
    q, k, v = qkv(rng, 1, 2 * 4 * 4 + 4, 2, 2, 16)
    plan = tilewise.Plan(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1))
    a = plan(q, k, v, text_len=4)
    b = plan(q, k, v, text_len=4)
    assert np.array_equal(a, b)
    # 32 video queries see 4 video keys (their tile) + 4 text keys; 4 text rows see 32 + 4 keys.
    assert plan.flops(4) == 4 * 16 * 2 * (32 * 4 + 32 * 4 + 4 * 36)
    assert plan.density() == pytest.approx(4 / 32)


def test_sm_margin_changes_no_bit(rng):
    """sm_margin only sizes the CUDA kernels' grids (the CPU ignores it): the same bits, function and Plan."""
    q, k, v = qkv(rng, 2, 2 * 4 * 4 + 4, 2, 1, 16)
    kw = dict(latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 2, 1), text_len=[4, 1])
    o = tilewise.sliding_tile_attention(q, k, v, **kw)
    assert np.array_equal(tilewise.sliding_tile_attention(q, k, v, sm_margin=8, **kw), o)
    plan = tilewise.Plan(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 2, 1), sm_margin=1 << 20)
    assert np.array_equal(plan(q, k, v, text_len=[4, 1]), o)


def test_tile_untile_round_trip(rng):
    x = rng.standard_normal((2, 4 * 4 * 6 + 3, 2, 8)).astype(np.float32)
    t = tilewise.tile(x, latent=(4, 4, 6), tile=(2, 2, 3))
    assert not np.array_equal(t, x)
    assert np.array_equal(t[:, -3:], x[:, -3:])  # text copied through
    assert np.array_equal(tilewise.untile(t, latent=(4, 4, 6), tile=(2, 2, 3)), x)
    # The first tile in tiled order holds tokens (t, h, w) in [0,2) x [0,2) x [0,3) in raster order.
    first = [x[:, (t_ * 4 + h) * 6 + w] for t_ in range(2) for h in range(2) for w in range(3)]
    assert np.array_equal(t[:, :12], np.stack(first, axis=1))


@pytest.mark.parametrize("call, exc, words", [
    (lambda q, k, v: tilewise.sliding_tile_attention(q.tolist(), k, v, latent=(2, 4, 4), window=(1, 1, 1)),
     TypeError, ["q", "numpy array"]),
    (lambda q, k, v: tilewise.sliding_tile_attention(q, k, v, latent=(3, 4, 4), window=(1, 1, 1)),
     ValueError, ["latent", "sequence length"]),
    (lambda q, k, v: tilewise.sliding_tile_attention(q, k, v, latent=(2, 4), window=(1, 1, 1)),
     ValueError, ["latent", "three integers"]),
    (lambda q, k, v: tilewise.sliding_tile_attention(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(0, 1, 1)),
     ValueError, ["window", "0x1x1", ">= 1"]),
    (lambda q, k, v: tilewise.sliding_tile_attention(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1),
                                                     text_len=9),
     ValueError, ["text_len[0]", "9"]),
    (lambda q, k, v: tilewise.sliding_tile_attention(q, k, v[:, :, :1], latent=(2, 4, 4), window=(1, 1, 1)),
     ValueError, ["k/v"]),
    (lambda q, k, v: tilewise.sliding_tile_attention(q.astype(np.int32), k, v, latent=(2, 4, 4), window=(1, 1, 1)),
     TypeError, ["dtype"]),
    (lambda q, k, v: tilewise.sliding_tile_attention(q, k, v, latent=(2, 4, 4), window=(1, 1, 1), layout="sbhd"),
     ValueError, ["layout", "bshd"]),
    (lambda q, k, v: tilewise.sliding_tile_attention(q, k, v, latent=(2, 4, 4), window=[(1, 1, 1)] * 3),
     ValueError, ["window", "3", "q_heads = 2"]),
])
def test_errors_name_the_argument(rng, call, exc, words):
    q, k, v = qkv(rng, 1, 2 * 4 * 4 + 4, 2, 2, 16)
    with pytest.raises(exc) as info:
        call(q, k, v)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# --- issue 14: every argument check of the Python layer, integers only, order, head_offset ---

def _small(rng, dtype=np.float32):
    return qkv(rng, 1, 2 * 4 * 4 + 4, 2, 2, 16, dtype)  # latent (2, 4, 4) + 4 text positions


def _sta(q, k, v, **kw):
    args = dict(latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1))
    args.update(kw)
    return tilewise.sliding_tile_attention(q, k, v, **args)


BAD_ARGUMENTS = [  # (keyword arguments, exception, words the message must contain)
    (dict(window=(1.9, 1, 1)), TypeError, ["window[0]", "1.9", "integer"]),
    (dict(window=(True, 1, 1)), TypeError, ["window[0]", "True"]),
    (dict(window="111"), ValueError, ["window", "'111'", "3x3x3"]),
    (dict(window="3x3"), ValueError, ["window", "'3x3'"]),
    (dict(window=[(1, 1, 1), "1x1"]), ValueError, ["window[1]", "'1x1'"]),
    (dict(window=3), TypeError, ["window", "three integers"]),
    (dict(latent=(2.5, 4, 4)), TypeError, ["latent[0]", "2.5"]),
    (dict(latent="244"), TypeError, ["latent", "'244'"]),
    (dict(latent=(2, 4)), ValueError, ["latent", "three integers"]),
    (dict(tile=(1, 2.0, 2)), TypeError, ["tile[1]", "2.0"]),
    (dict(text_len=3.9), TypeError, ["text_len", "3.9"]),
    (dict(text_len="3"), TypeError, ["text_len", "'3'"]),
    (dict(text_len=[2.0]), TypeError, ["text_len[0]", "2.0"]),
    (dict(text_len=np.array([2.0])), TypeError, ["text_len[0]", "2.0"]),
    (dict(text_len=[1, 2]), ValueError, ["text_len", "2 values"]),
    (dict(text_len=5), ValueError, ["text_len[0] = 5", "capacity 4"]),
    (dict(text_len=-1), ValueError, ["text_len[0] = -1"]),
    (dict(head_offset=0.0), TypeError, ["head_offset", "0.0"]),
    (dict(head_offset=-1), ValueError, ["head_offset", "-1"]),
    (dict(sm_margin=1.5), TypeError, ["sm_margin", "1.5"]),
    (dict(sm_margin=-1), ValueError, ["invalid sm_margin = -1", ">= 0"]),
    (dict(scale="0.5"), TypeError, ["scale", "'0.5'"]),
    (dict(scale=True), TypeError, ["scale", "True"]),
    (dict(order="zigzag"), ValueError, ["order", "'zigzag'", "'raster'", "'tiled'"]),
    (dict(order="tiled", latent=(2, 4, 4), tile=(1, 3, 2)), ValueError, ["order", "multiple of the tile"]),
    (dict(text_position="middle"), ValueError, ["text_position", "'middle'", "'first'"]),
    (dict(layout="sbhd"), ValueError, ["layout", "'sbhd'", "'bshd'"]),
]


@pytest.mark.parametrize("kwargs, exc, words", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument_and_value(rng, kwargs, exc, words):
    q, k, v = _small(rng)
    for make in (lambda: _sta(q, k, v, **kwargs),  # the function and Plan refuse alike
                 lambda: tilewise.Plan(q, k, v, **{**dict(latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1)),
                                                   **{a: b for a, b in kwargs.items() if a != "text_len"}})(
                     q, k, v, text_len=kwargs.get("text_len"))):
        with pytest.raises(exc) as info:
            make()
        for w in words:
            assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("call, exc, words", [
    (lambda q, k, v: tilewise.attention_tile(q, k, v, latent=(2, 4, 4), global_frames=1.5), TypeError,
     ["global_frames", "1.5"]),
    (lambda q, k, v: tilewise.attention_tile(q, k, v, latent=(2, 4, 4), global_frames=[1, "0"]), TypeError,
     ["global_frames[1]", "'0'"]),
    (lambda q, k, v: tilewise.attention_tile(q, k, v, latent=(2, 4, 4), global_frames=1, radius=0.5), TypeError,
     ["radius", "0.5"]),
    (lambda q, k, v: tilewise.block_sparse_attention(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2),
                                                     block_offsets=[0, 1.0], block_tiles=[0]), TypeError,
     ["block_offsets[1]", "1.0"]),
    (lambda q, k, v: tilewise.block_sparse_attention(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), block_offsets=3,
                                                     block_tiles=[0]), TypeError, ["block_offsets", "sequence"]),
    (lambda q, k, v: tilewise.Plan(q, k, v, latent=(2, 4, 4), pattern="block_list"), ValueError,
     ["block_offsets, block_tiles"]),
    (lambda q, k, v: tilewise.Plan(q, k, v, latent=(2, 4, 4), pattern="stripes"), ValueError,
     ["pattern", "'stripes'", "'sliding_tile'"]),
    (lambda q, k, v: _sta(q, k.astype(np.float64), v), TypeError, ["k", "float64", "differs"]),
    (lambda q, k, v: _sta(q[0], k[0], v[0]), ValueError, ["q.ndim = 3"]),
    (lambda q, k, v: _sta(q, k, np.ndarray(v.shape, np.float32, np.zeros(2 * v.nbytes, np.uint8),
                                           strides=(v.strides[0] + 2,) + v.strides[1:])),
     ValueError, ["v", "strides"]),
    (lambda q, k, v: _sta(q, k, v.tolist()), TypeError, ["v", "numpy array"]),
    (lambda q, k, v: tilewise.tile(q[:, :, :1], latent=(2, 4, 4), tile=(1, 2, 2)), ValueError, ["x", "contiguous"]),
    (lambda q, k, v: tilewise.tile(q.astype(np.int16), latent=(2, 4, 4), tile=(1, 2, 2)), TypeError,
     ["x", "int16"]),
    (lambda q, k, v: tilewise.tile(q, latent=(3, 4, 4), tile=(1, 2, 2)), ValueError, ["latent", "S = 36"]),
    (lambda q, k, v: tilewise.tile(q, latent=(2, 4, 4), tile=(1, 2, 2), text_position="x"), ValueError,
     ["text_position", "'x'"]),
    (lambda q, k, v: tilewise.Plan(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1)).window(0.0),
     TypeError, ["head", "0.0"]),
    (lambda q, k, v: tilewise.Plan(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1)).window(2),
     ValueError, ["head", "2"]),
    (lambda q, k, v: tilewise.Plan(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1))(q[:, :35], k[:, :35],
                                                                                             v[:, :35]),
     ValueError, ["differ from the ones this Plan"]),
    (lambda q, k, v: tilewise.effective_window("1x1", latent=(2, 4, 4), tile=(1, 2, 2)), ValueError,
     ["window", "'1x1'"]),
    (lambda q, k, v: tilewise.tile_grid((2, 4, 4), (1, 0, 2)), ValueError, ["tile", "1x0x2"]),
    (lambda q, k, v: tilewise.supports("cpu", "f32", 64.0), TypeError, ["head_dim", "64.0"]),
])
def test_other_argument_checks(rng, call, exc, words):
    q, k, v = _small(rng)
    with pytest.raises(exc) as info:
        call(q, k, v)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_integer_types_and_the_window_spelling_are_accepted(rng):
    q, k, v = _small(rng)
    ref, ref_lse = oracle(*(x.astype(np.float64) for x in (q, k, v)), (2, 4, 4), (1, 2, 2),
                          sta_mask((2, 4, 4), (1, 2, 2), [(1, 3, 1)]), np.array([3]))
    for kw in (dict(window=(1, 3, 1), text_len=3),
               dict(window="1x3x1", text_len=np.int64(3)),
               dict(window=np.array([1, 3, 1]), text_len=np.array([3], dtype=np.int16),
                    latent=np.array([2, 4, 4]), tile=(np.int32(1), np.uint8(2), 2)),
               dict(window=["1x3x1", (1, 3, 1)], text_len=np.array(3))):
        o, lse = _sta(q, k, v, return_lse=True, **kw)
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    plan = tilewise.Plan(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window="1x3x1")
    np.testing.assert_allclose(plan(q, k, v, text_len=3), ref, rtol=1e-4, atol=1e-5)


def test_grid_and_effective_windows_come_from_the_library(rng):
    q, k, v = _small(rng)
    assert tilewise.tile_grid((5, 6, 7), (2, 4, 4)) == (3, 2, 2)
    assert tilewise.effective_window("9x1x2", latent=(5, 6, 7), tile=(2, 4, 4)) == (3, 1, 2)
    plan = tilewise.Plan(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=[(5, 1, 1), (1, 2, 9)])
    assert plan.grid() == (2, 2, 2)
    assert [plan.window(h) for h in range(2)] == [(2, 1, 1), (1, 2, 2)]
    assert tilewise.supports("cpu", "bf16", 80) and tilewise.supports("cpu", "f64", 1)
    assert isinstance(tilewise.cuda_available(), bool)


def test_tiled_order_equals_raster_order_reordered(rng):
    latent, tile = (4, 4, 6), (2, 2, 3)
    q, k, v = qkv(rng, 2, 96 + 5, 4, 2, 16)
    raster = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=[(1, 2, 1), (2, 1, 2)] * 2,
                                             text_len=[5, 2])
    tq, tk, tv = (tilewise.tile(x, latent=latent, tile=tile) for x in (q, k, v))
    tiled = tilewise.sliding_tile_attention(tq, tk, tv, latent=latent, tile=tile, order="tiled",
                                            window=[(1, 2, 1), (2, 1, 2)] * 2, text_len=[5, 2])
    np.testing.assert_allclose(tilewise.untile(tiled, latent=latent, tile=tile), raster, rtol=1e-5, atol=1e-6)
    plan = tilewise.Plan(tq, tk, tv, latent=latent, tile=tile, order="tiled", window=[(1, 2, 1), (2, 1, 2)] * 2)
    np.testing.assert_allclose(plan(tq, tk, tv, text_len=[5, 2]), tiled, rtol=0, atol=0)


def test_head_offset_indexes_the_global_window_table(rng):
    latent, tile = (2, 4, 6), (1, 2, 2)
    q, k, v = qkv(rng, 1, 48 + 3, 2, 1, 16)       # 2 local heads of 4 global ones (e.g. rank 1 of 2)
    table = [(1, 1, 1), (2, 2, 2), (1, 1, 3), (2, 1, 1)]
    o = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=table, head_offset=2, text_len=2)
    ref, _ = oracle(*(x.astype(np.float64) for x in (q, k, v)), latent, tile, sta_mask(latent, tile, table[2:]),
                    np.array([2]))
    np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="window"):  # 4 global heads cannot hold local heads 3 and 4
        tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=table, head_offset=3)
