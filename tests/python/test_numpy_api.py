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
