"""Window calibration (tilewise.calibrate): per-head errors against an independent numpy oracle, recovery of
planted locality, selection rules, frame-pattern search, file formats (tilewise, FastVideo, captures, PNG) and
the CLI. Small latents keep the CPU backend fast."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tilewise
import tilewise.calibrate as cal
from tilewise.calibrate import cli, report
from tilewise.calibrate.capture import check_finite
from tilewise.calibrate.strategy import Strategy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print("seed", seed)
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------------
# Oracle: masked attention written from the spec, vectorised over (query, key)

def spec_window(c, k, n):
    """Spec: k >= n -> [0, n); else start = clamp(c - k // 2, 0, n - k), key tiles [start, start + k)."""
    lo = np.where(k >= n, 0, np.clip(c - k // 2, 0, max(n - k, 0)))
    return lo, np.where(k >= n, n, lo + k)


def video_coords(latent):
    T, H, W = latent
    i = np.arange(T * H * W)
    return np.stack([i // (H * W), (i // W) % H, i % W], axis=1)


def oracle_attention(q, k, v, latent, tile, allowed, text_len, scale):
    """q, k, v [B, S, H, D] float64, text after the video; allowed(h) -> [N, N] bool video mask."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    N = int(np.prod(latent))
    o = np.zeros_like(q)
    for b in range(B):
        L = S - N if text_len is None else text_len[b]
        for h in range(Hq):
            mask = np.zeros((S, S), bool)
            mask[:N, :N] = allowed(h)
            mask[N:, :N] = True                      # text rows see the whole video
            mask[:, N:N + L] = True                  # everyone sees the valid text
            s = scale * q[b, :, h] @ k[b, :, h // (Hq // Hk)].T
            s[~mask] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            o[b, :, h] = p @ v[b, :, h // (Hq // Hk)] / p.sum(axis=1, keepdims=True)
    return o


def sta_allowed(latent, tile, window):
    c = video_coords(latent)
    tiles = c // np.array(tile)
    n = [-(-a // t) for a, t in zip(latent, tile)]
    ok = np.ones((len(c), len(c)), bool)
    for a in range(3):
        lo, hi = spec_window(tiles[:, a], window[a], n[a])
        ok &= (tiles[None, :, a] >= lo[:, None]) & (tiles[None, :, a] < hi[:, None])
    return ok


def frame_allowed(latent, g, r):
    f = video_coords(latent)[:, 0]
    return (f[:, None] < g) | (f[None, :] < g) | (np.abs(f[:, None] - f[None, :]) <= r)


def per_head_errors(o, ref):
    d = o - ref
    return (d ** 2).mean(axis=(0, 1, 3)), np.abs(d).mean(axis=(0, 1, 3)), (ref ** 2).mean(axis=(0, 1, 3))


# ---------------------------------------------------------------------------------------------------------------
# Planted locality: score(i, j) = -sum_a alpha_a * (x_i,a - x_j,a)^2 + row constant + small noise

LATENT, TILE = (4, 8, 8), (2, 4, 4)           # grid 2x2x2: along each axis a window is 1 (own tile) or 2 (all)
LOCAL, TEXT = 12.0, 8


def planted_qkv(rng, alphas, latent=LATENT, batch=1, text=TEXT, noise=0.1, dtype=np.float32):
    """alphas: [(alpha_t, alpha_h, alpha_w)] per head. q.k = sum_a alpha_a (2 x_i x_j - x_j^2), so with scale
    1 the softmax sees -sum_a alpha_a (x_i - x_j)^2: a Gaussian decay of its own width along each axis."""
    H, D = len(alphas), 64
    x = (video_coords(latent) - (np.array(latent) - 1) / 2.0)[None, :, None, :]   # centred coordinates
    al = np.array(alphas, float)[None, None, :, :]
    N, S = int(np.prod(latent)), int(np.prod(latent)) + text
    q = noise * rng.standard_normal((batch, S, H, D))
    k = noise * rng.standard_normal((batch, S, H, D))
    q[:, :N, :, 0:3] = x
    q[:, :N, :, 3] = 1.0
    k[:, :N, :, 0:3] = 2 * al * x
    k[:, :N, :, 3] = -(al * x ** 2).sum(axis=-1)
    v = rng.standard_normal((batch, S, H, D))
    return [a.astype(dtype) for a in (q, k, v)]


HEAD_PATTERNS = list(itertools.product([False, True], repeat=3))  # local along (t, h, w)?
ALPHAS = [tuple(LOCAL if loc else 0.0 for loc in p) for p in HEAD_PATTERNS]
PLANTED = [tuple(1 if loc else 2 for loc in p) for p in HEAD_PATTERNS]
CANDIDATES = [w for w in itertools.product([1, 2], repeat=3) if w != (2, 2, 2)]


def geometry(**kw):
    return cal.Geometry(latent=kw.pop("latent", LATENT), tile=kw.pop("tile", TILE), scale=kw.pop("scale", 1.0), **kw)


# ---------------------------------------------------------------------------------------------------------------
# evaluate(): errors and costs against the oracle

@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_evaluate_matches_oracle_with_gqa_text_padding_and_partial_tiles(rng, layout):
    latent, tile, text = (3, 5, 6), (2, 2, 4), 5
    S, Hq, Hk, D = 90 + text, 4, 2, 16
    q, k, v = (rng.standard_normal((2, S, h, D)) for h in (Hq, Hk, Hk))
    text_len = [2, 5]
    cands = [(1, 1, 1), (1, 3, 1), (2, 2, 2), (3, 1, 2)]
    g = cal.Geometry(latent=latent, tile=tile, text_len=text_len, layout=layout)
    args = [x if layout == "bshd" else x.transpose(0, 2, 1, 3).copy() for x in (q, k, v)]
    ev = cal.evaluate(*args, g, cands)
    scale = 1 / np.sqrt(D)
    dense = oracle_attention(q, k, v, latent, tile, lambda h: np.ones((90, 90), bool), text_len, scale)
    for c, w in enumerate(cands):
        ref = oracle_attention(q, k, v, latent, tile, lambda h: sta_allowed(latent, tile, w), text_len, scale)
        mse, l1, energy = per_head_errors(ref, dense)
        np.testing.assert_allclose(ev.mse[c], mse, rtol=1e-7, atol=1e-14)
        np.testing.assert_allclose(ev.l1[c], l1, rtol=1e-7, atol=1e-14)
        np.testing.assert_allclose(ev.energy, energy, rtol=1e-10)
        np.testing.assert_allclose(ev.rel_mse[c], mse / energy, rtol=1e-7, atol=1e-14)
        assert ev.density[c] == pytest.approx(sta_allowed(latent, tile, w).mean())
    assert ev.mse[0].min() > 0          # the sparsest window does change every head
    # FLOPs: 4 * D * allowed pairs, text rows and valid text keys included (spec §7)
    n, w = 90, cands[0]
    pairs = sum(Hq * (sta_allowed(latent, tile, w).sum() + n * L + text * (n + L)) for L in text_len)
    assert ev.flops[0] == 4 * D * pairs


def test_evaluate_frames_matches_oracle(rng):
    latent, tile = (5, 2, 3), (1, 2, 3)
    q, k, v = (rng.standard_normal((1, 30 + 4, 2, 16)) for _ in range(3))
    ev = cal.evaluate_frames(q, k, v, cal.Geometry(latent=latent, tile=tile), [0, 1, 2, 5], radius=1)
    scale = 1 / np.sqrt(16)
    dense = oracle_attention(q, k, v, latent, tile, lambda h: np.ones((30, 30), bool), None, scale)
    for c, gf in enumerate([0, 1, 2, 5]):
        ref = oracle_attention(q, k, v, latent, tile, lambda h: frame_allowed(latent, gf, 1), None, scale)
        np.testing.assert_allclose(ev.mse[c], per_head_errors(ref, dense)[0], rtol=1e-7, atol=1e-14)
        assert ev.density[c] == pytest.approx(frame_allowed(latent, gf, 1).mean())
    assert ev.candidates[-1] == (5, 1) and ev.density[-1] == 1.0 and not ev.mse[-1].any()


def test_candidates_are_clamped_to_the_grid_and_the_grid_window_is_dense(rng):
    q, k, v = planted_qkv(rng, ALPHAS[:2])
    ev = cal.evaluate(q, k, v, geometry(), [(1, 5, 1), (3, 3, 3)])
    assert ev.candidates == [(1, 2, 1), (2, 2, 2)]
    assert ev.density[1] == 1.0 and not ev.mse[1].any() and not ev.l1[1].any()
    with pytest.raises(ValueError, match="repeats"):
        cal.evaluate(q, k, v, geometry(), [(1, 2, 1), (1, 7, 1)])


def test_evaluate_runs_dense_once_and_each_sparse_candidate_once(rng, monkeypatch):
    """The cost goal (one (step, layer) costs little more than its bare attention calls) in countable form:
    dense attention once, each candidate sparser than dense once, a candidate equal to the grid never, and the
    cost model's plans are made once per shape, not per call."""
    q, k, v = planted_qkv(rng, ALPHAS)
    g = geometry(text_len=5)
    calls = {"dense": 0, "sparse": [], "plans": 0}
    dense, sparse, plan = tilewise.dense_attention, tilewise.sliding_tile_attention, tilewise.Plan

    def count_dense(*a, **kw):
        calls["dense"] += 1
        return dense(*a, **kw)

    def count_sparse(*a, window, **kw):
        calls["sparse"].append(tuple(window))
        return sparse(*a, window=window, **kw)

    def count_plan(*a, **kw):
        calls["plans"] += 1
        return plan(*a, **kw)

    monkeypatch.setattr(tilewise, "dense_attention", count_dense)
    monkeypatch.setattr(tilewise, "sliding_tile_attention", count_sparse)
    monkeypatch.setattr(tilewise, "Plan", count_plan)
    cands = CANDIDATES[:5] + [(2, 2, 2)]
    for repeat in range(3):
        cal.evaluate(q, k, v, g, cands)
        assert calls["dense"] == repeat + 1
        assert calls["sparse"] == CANDIDATES[:5] * (repeat + 1)
    assert calls["plans"] <= len(cands) + 1   # cost model: one plan per pattern, cached across calls


# ---------------------------------------------------------------------------------------------------------------
# Search and selection

def make_captures(rng, steps, layers, alphas=ALPHAS, samples=1, **kw):
    g = geometry(text_len=kw.pop("text_len", TEXT))
    return [cal.Capture(s, l, *planted_qkv(rng, alphas, **kw), geometry=g, sample=x)
            for s in steps for l in layers for x in range(samples)]


def test_search_recovers_the_planted_window_of_every_head(rng):
    caps = make_captures(rng, steps=[0], layers=[0, 1], samples=2)
    result = cal.search(caps, CANDIDATES)
    err = result.error("rel_mse")
    # Sanity of the construction: cutting a local axis costs ~e^-12, cutting a global axis costs O(0.1).
    for h, planted in enumerate(PLANTED):
        for c, w in enumerate(result.candidates):
            cuts_global = any(wa < pa for wa, pa in zip(w, planted))
            assert (err[:, c, h] > 1e-2).all() if cuts_global else (err[:, c, h] < 1e-6).all(), (h, w)
    strategy = result.select(budget=1e-3, metric="rel_mse")
    for layer in (0, 1):
        assert strategy.windows_for(0, layer, len(PLANTED)) == PLANTED
    # argmin never cuts a global axis of a head that has a candidate avoiding it
    strategy = result.select(argmin=True, metric="rel_mse")
    for h, planted in enumerate(PLANTED):
        if planted == (2, 2, 2):
            continue
        w = strategy.window(0, 0, h)
        assert all(wa >= pa for wa, pa in zip(w, planted)), (h, w)


def test_budget_extremes_and_skip_steps(rng):
    caps = make_captures(rng, steps=[0, 1, 2], layers=[0], alphas=ALPHAS[:3])
    calls = []
    result = cal.search(caps, CANDIDATES, skip_steps=2, progress=lambda d, t, label: calls.append((d, t, label)))
    assert result.keys == [(2, 0)] and result.skipped == [(0, 0), (1, 0)]
    assert calls[-1][:2] == (8, 8) and "step 2 layer 0" in calls[-1][2]   # dense + 7 candidates, steps 0-1 not run
    grid = (2, 2, 2)
    sparsest = CANDIDATES[int(np.argmin(result.density))]
    assert sparsest == (1, 1, 1)
    inf = result.select(budget=float("inf"))
    zero = result.select(budget=0.0)
    for s, h in itertools.product(range(3), range(3)):
        assert inf.window(s, 0, h) == (grid if s < 2 else sparsest)
        assert zero.window(s, 0, h) == grid
    assert inf.skip_steps == 2 and inf.search["budget"] == "inf"
    assert result.select(budget=float("inf"), skip_steps=3).windows_for(2, 0, 3) == [grid] * 3
    with pytest.raises(ValueError, match="skip_steps"):
        result.select(budget=1.0, skip_steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        result.select()
    # argmin ignores a candidate equal to the grid (it is dense, error 0, and would always win)
    with_grid = cal.search(caps, [(1, 1, 1), (3, 3, 3)], skip_steps=2)
    assert with_grid.candidates == [(1, 1, 1), (2, 2, 2)]
    assert with_grid.select(argmin=True).windows_for(2, 0, 3) == [(1, 1, 1)] * 3
    assert cal.search(caps, [(3, 3, 3)], skip_steps=2).select(argmin=True).windows_for(2, 0, 3) == [grid] * 3


def test_budget_picks_the_cheapest_admissible_candidate(rng):
    caps = make_captures(rng, steps=[0], layers=[0])
    result = cal.search(caps, CANDIDATES)
    err = result.error("mse")[0]
    for budget in sorted(set(np.quantile(err, [0.1, 0.3, 0.5, 0.7, 0.9]))):
        chosen = result.choose(budget=budget)[0]
        for h in range(len(ALPHAS)):
            ok = [c for c in range(len(CANDIDATES)) if err[c, h] <= budget]
            if not ok:
                assert chosen[h] == -1
            else:
                assert result.density[chosen[h]] == min(result.density[c] for c in ok)
                assert err[chosen[h], h] <= budget


def test_fill_previous_for_uncaptured_steps(rng):
    caps = make_captures(rng, steps=[1, 3], layers=[0], alphas=ALPHAS[-2:])
    result = cal.search(caps, CANDIDATES, skip_steps=1)
    s = result.select(budget=float("inf"), num_steps=6, fill="previous")
    assert s.window(1, 0, 0) == (1, 1, 1) and s.window(2, 0, 0) == (1, 1, 1) and s.window(5, 0, 1) == (1, 1, 1)
    assert (0, 0, 0) not in s.windows and s.window(0, 0, 0) == (2, 2, 2)   # before skip_steps: default, dense
    assert (2, 0, 0) not in result.select(budget=float("inf"), num_steps=6).windows


def test_search_result_round_trip(rng, tmp_path):
    result = cal.search(make_captures(rng, steps=[0, 1], layers=[0], alphas=ALPHAS[:2]), CANDIDATES, skip_steps=1)
    result.save(tmp_path / "r.npz")
    back = cal.SearchResult.load(tmp_path / "r.npz")
    assert back.keys == result.keys and back.skipped == result.skipped and back.candidates == result.candidates
    np.testing.assert_array_equal(back.mse, result.mse)
    assert back.select(budget=1e-3) == result.select(budget=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# FP8 as a candidate dimension (docs/semantics.md §11)

def test_fp8_candidates_errors_and_selection(rng, tmp_path):
    caps = make_captures(rng, steps=[0, 1], layers=[0], alphas=ALPHAS[:2])
    windows = [(1, 1, 1), (2, 2, 2)]
    result = cal.search(caps, windows, precisions=("native", "fp8"))
    assert result.candidates == windows * 2 and result.candidate_precisions == ["native"] * 2 + ["fp8"] * 2
    assert [result.label(c) for c in range(4)] == ["1x1x1", "2x2x2", "1x1x1 fp8", "2x2x2 fp8"]
    err = result.error("rel_mse")
    assert (err[:, 1] == 0).all()                                # the dense window in bf16: not run, exact
    # The dense window in FP8: its quantisation only, nonzero and far below a window's own error. The planted local
    # head's large logits make e4m3's 2^-4 relative rounding of Q and K move its scores by whole units: over 30
    # seeds its rel_mse was 0.0008-0.053 (the 1x1x1 window's native error 2.4-9.8), so the bound keeps 2x margin
    # (0.05, set before that measurement, failed about 1 run in 8).
    assert (err[:, 3] > 1e-5).all() and (err[:, 3] < 0.1).all() and (err[:, 3] < err[:, 0] / 20).all()
    assert (err[:, 2] >= err[:, 0] * 0.5).all()                  # FP8 adds to the window's own error
    np.testing.assert_array_equal(result.cost(0.5), [0.125, 1.0, 0.0625, 0.5])

    fp8 = result.select(budget=float("inf"), fp8_cost=0.6)       # the cheapest: the sparsest window in FP8
    assert fp8.fp8 == {(s, 0, h) for s in (0, 1) for h in range(2)} and fp8.window(0, 0, 0) == (1, 1, 1)
    assert fp8.precision(0, 0, 2) == "fp8" and fp8.search["fp8_cost"] == 0.6
    assert result.select(budget=float("inf")).search["fp8_cost"] == cal.FP8_COST == 1.0  # the measured default
    # a budget between the FP8 error of the dense window and 0 keeps the heads native and dense
    native = result.select(budget=float(err[:, 3].min()) / 2, metric="rel_mse")
    assert not native.fp8 and native.precision(0, 0, 2) == "native"
    same_cost = result.choose(budget=float("inf"), fp8_cost=1.0)      # the sparsest window: the lower error wins
    mse = result.error("mse")
    for n, h in itertools.product(range(2), range(2)):
        assert same_cost[n, h] == (0 if mse[n, 0, h] <= mse[n, 2, h] else 2)
    with pytest.raises(ValueError, match=r"invalid fp8_cost = 0.0: expected a number in \(0, 1\]"):
        result.select(budget=1.0, fp8_cost=0.0)

    fp8.save(tmp_path / "s.json")
    assert Strategy.load(tmp_path / "s.json") == fp8
    assert json.loads((tmp_path / "s.json").read_text())["fp8"][:2] == ["0_0_0", "0_0_1"]
    result.save(tmp_path / "r.npz")
    back = cal.SearchResult.load(tmp_path / "r.npz")
    assert back.candidate_precisions == result.candidate_precisions
    assert back.select(budget=float("inf"), fp8_cost=0.6) == fp8
    with pytest.raises(ValueError, match="invalid precisions"):
        cal.search(caps, windows, precisions=("fp16",))


def test_fp8_strategy_precision_is_per_call():
    s = Strategy(windows={(0, 0, 0): (1, 1, 1), (0, 0, 1): (1, 1, 1)}, grid=(2, 2, 2), fp8={(0, 0, 0), (0, 1, 0),
                                                                                           (0, 1, 1)})
    assert s.precision(0, 0, 2) == "native"   # head 1 of layer 0 did not choose FP8
    assert s.precision(0, 1, 2) == "fp8" and s.precision(1, 1, 2) == "native" and s.precision(None, 1, 2) == "native"
    assert s.precision(0, 1, 1, head_offset=1) == "fp8"
    with pytest.raises(ValueError, match="invalid \"fp8\""):
        Strategy.from_json({"format": "tilewise-strategy", "fp8": "0_0_0"})
    with pytest.raises(ValueError, match="invalid .* fp8 key '0_0'"):
        Strategy.from_json({"format": "tilewise-strategy", "fp8": ["0_0"]})


def test_cli_fp8(rng, tmp_path, capsys):
    caps = write_captures(rng, tmp_path / "caps", steps=[0], layers=[0])
    out = tmp_path / "s.json"
    rc, err = run_cli(capsys, "--captures", caps, "--candidates", "1x1x1,2x2x2", "--budget", "inf", "--fp8",
                      "--fp8-cost", "0.5", "--out", out, "--quiet")
    assert rc == 0, err
    s = Strategy.load(out)
    assert s.fp8 == {(0, 0, h) for h in range(4)} and s.search["fp8_cost"] == 0.5
    rc, err = run_cli(capsys, "--captures", caps, "--candidates", "1x1x1", "--argmin", "--fp8-cost", "2", "--out",
                      out)
    assert rc == 2 and "invalid --fp8-cost = 2: expected a number in (0, 1]" in err
    rc, err = run_cli(capsys, "--errors", tmp_path / "s.search.npz", "--argmin", "--fp8", "--out", out)
    assert rc == 2 and "--fp8 evaluates the --candidates in FP8 too" in err


# ---------------------------------------------------------------------------------------------------------------
# Frame pattern search

def test_frame_pattern_search_smallest_g_under_threshold_and_monotone(rng):
    latent, tile, text = (6, 4, 4), (1, 4, 4), 4
    g = cal.Geometry(latent=latent, tile=tile, scale=1.0)
    caps, data = [], {}
    for layer, alpha_t in enumerate([2.0, 0.2]):       # layer 0: sharply local in time, layer 1: broad
        for step in (0, 1):
            q, k, v = planted_qkv(rng, [(alpha_t, 0.0, 0.0), (alpha_t / 2, 0.5, 0.0)], latent=latent, text=text,
                                  noise=0.3, dtype=np.float64)
            caps.append(cal.Capture(step, layer, q, k, v, geometry=g))
            data[(step, layer)] = (q, k, v)
    fr = cal.search_frame_patterns(caps, radius=0)
    assert fr.global_frames == list(range(7)) and fr.layers == [0, 1]
    # Oracle loss: mean over steps of the mean over heads of rel_mse, from the numpy oracle
    N = 96
    oracle = np.zeros((2, 7))
    for (step, layer), (q, k, v) in data.items():
        dense = oracle_attention(q, k, v, latent, tile, lambda h: np.ones((N, N), bool), None, 1.0)
        for gf in range(7):
            o = oracle_attention(q, k, v, latent, tile, lambda h: frame_allowed(latent, gf, 0), None, 1.0)
            mse, _, energy = per_head_errors(o, dense)
            oracle[layer, gf] += (mse / energy).mean() / 2
    np.testing.assert_allclose(fr.loss, oracle, rtol=1e-6, atol=1e-15)
    assert oracle[:, 6].max() == 0 and oracle[0, 1] < oracle[1, 1]
    values = np.unique(oracle)
    thresholds = [0.0] + [(a + b) / 2 for a, b in zip(values, values[1:]) if b - a > 1e-3 * b] + [values[-1] * 2]
    previous = None
    for thr in thresholds:
        choice = fr.select(thr)
        for layer in (0, 1):
            expected = min(gf for gf in range(7) if oracle[layer, gf] <= thr)
            assert choice[layer] == (expected, 0), (thr, layer)
        if previous:
            assert all(choice[l][0] <= previous[l][0] for l in (0, 1))   # monotone in the threshold
        previous = choice
    # g = T - 1 is dense too (the last frame sees every other frame because they are all global)
    assert fr.density[5] == fr.density[6] == 1.0 and fr.select(0.0) == {0: (5, 0), 1: (5, 0)}


# ---------------------------------------------------------------------------------------------------------------
# Formats: tilewise strategy, FastVideo mask_strategy, captures, PNG

def test_strategy_round_trip_and_lookups(tmp_path):
    s = Strategy(windows={(0, 0, 0): (3, 3, 3), (0, 0, 1): (2, 5, 5), (4, 1, 2): (1, 6, 10)}, latent=(30, 48, 80),
                 tile=(6, 8, 8), skip_steps=1, frame_patterns={0: (1, 0), 3: (2, 1)}, search={"budget": 0.1})
    assert s.grid == (5, 6, 10)
    s.save(tmp_path / "s.json")
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["format"] == "tilewise-strategy" and d["windows"]["0_0_1"] == [2, 5, 5]
    assert d["frame_patterns"] == {"0": [1, 0], "3": [2, 1]}
    back = Strategy.load(tmp_path / "s.json")
    assert back == s
    assert back.window(9, 9, 9) == (5, 6, 10)                               # missing key: dense
    assert back.windows_for(0, 0, 2) == [(3, 3, 3), (2, 5, 5)]
    assert back.windows_for(4, 1, 2, head_offset=1) == [(5, 6, 10), (1, 6, 10)]
    assert back.frame_pattern(0, 0) is None and back.frame_pattern(1, 3) == (2, 1) and back.frame_pattern(5, 1) is None
    assert Strategy(windows={}, default=(1, 1, 1)).window(0, 0, 0) == (1, 1, 1)
    with pytest.raises(KeyError, match="no window"):
        Strategy(windows={}).window(0, 0, 0)
    with pytest.raises(ValueError, match="grid"):
        Strategy.load(tmp_path / "s.json", grid=(5, 6, 11))


def test_fastvideo_format_round_trip(tmp_path):
    # As FastVideo writes it: json.dump(indent=4) of {"t_l_h": [kt, kh, kw]}; [5, 6, 10] = its full attention
    fv = {f"{t}_{l}_{h}": ([5, 6, 10] if t == 0 else [3, 3, 3] if h else [1, 5, 7])
          for t in range(2) for l in range(2) for h in range(3)}
    (tmp_path / "mask_strategy.json").write_text(json.dumps(fv, indent=4))
    s = Strategy.load(tmp_path / "mask_strategy.json", latent=(30, 48, 80), tile=(6, 8, 8))
    assert s.window(1, 1, 0) == (1, 5, 7) and s.window(0, 1, 2) == (5, 6, 10) and s.is_dense(s.window(0, 0, 0))
    s.save_fastvideo(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == fv
    # missing keys are filled (FastVideo needs every step x layer x head) with the dense window
    partial = Strategy(windows={(1, 0, 1): (3, 3, 3)}, grid=(5, 6, 10))
    table = partial.to_fastvideo(num_steps=2, num_layers=1, num_heads=2)
    assert table == {"0_0_0": [5, 6, 10], "0_0_1": [5, 6, 10], "1_0_0": [5, 6, 10], "1_0_1": [3, 3, 3]}


def test_fastvideo_even_windows_are_refused_with_the_key(tmp_path):
    path = tmp_path / "fv.json"
    path.write_text(json.dumps({"0_0_0": [3, 3, 3], "7_12_5": [3, 4, 10]}))
    with pytest.raises(ValueError) as info:
        Strategy.load(path, grid=(5, 6, 10))
    msg = str(info.value)
    for words in ("7_12_5", "[3, 4, 10]", "even window 4 along h", "6 tiles", "use 5"):
        assert words in msg, (words, msg)
    widened = Strategy.load(path, grid=(5, 6, 10), even_windows="widen")
    assert widened.window(7, 12, 5) == (3, 5, 10)
    with pytest.raises(ValueError, match="needs the grid"):
        Strategy.load(path)
    # even windows equal to the grid (whole axis) mean the same in both
    path.write_text(json.dumps({"0_0_0": [4, 6, 10]}))
    assert Strategy.load(path, grid=(4, 6, 10)).window(0, 0, 0) == (4, 6, 10)
    # writing: tilewise's asymmetric even window cannot be expressed in FastVideo's format
    s = Strategy(windows={(2, 3, 1): (3, 2, 3)}, grid=(5, 6, 10))
    with pytest.raises(ValueError, match='"2_3_1".*even window 2 along h'):
        s.save_fastvideo(tmp_path / "no.json")
    path.write_text(json.dumps({"0_0": [3, 3, 3]}))
    with pytest.raises(ValueError, match="neither a tilewise strategy .* nor a FastVideo"):
        Strategy.load(path)
    path.write_text(json.dumps({"0_0_0": [3, 0, 3]}))
    with pytest.raises(ValueError, match='"0_0_0".*three integers >= 1'):
        Strategy.load(path, grid=(5, 6, 10))


def test_capture_files_round_trip(rng, tmp_path):
    q, k, v = (rng.standard_normal((2, 40, 2, 8)).astype(np.float16) for _ in range(3))
    g = cal.Geometry(latent=(2, 4, 4), tile=(1, 2, 2), text_len=[3, 8], layout="bhsd", scale=0.5)
    qb, kb, vb = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    cal.save_capture(tmp_path, step=3, layer=1, q=qb, k=kb, v=vb, geometry=g, sample=1)
    cal.save_capture(tmp_path, step=0, layer=2, q=qb, k=kb, v=vb, geometry=g)
    (tmp_path / "unrelated.json").write_text("{}")
    caps = cal.load_captures(tmp_path)
    assert [(c.step, c.layer, c.sample) for c in caps] == [(0, 2, 0), (3, 1, 1)]
    c = caps[1]
    assert c.geometry == g and c.heads == 2 and c.q.dtype == np.float16
    np.testing.assert_array_equal(c.q, qb)
    np.testing.assert_array_equal(c.v, vb)
    m = json.loads((tmp_path / "step0003_layer001_sample001.json").read_text())
    assert m["format"] == "tilewise-capture" and m["q"] == "step0003_layer001_sample001.q.npy"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no capture manifests"):
        cal.load_captures(tmp_path / "empty")
    with pytest.raises(ValueError, match="latent"):
        cal.save_capture(tmp_path, step=0, layer=0, q=qb, k=kb, v=vb, geometry=cal.Geometry(latent=(4, 4, 4)))


def read_png(path):
    """The image as an [H, W, C] array, read with matplotlib (an independent PNG reader)."""
    import matplotlib.image

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_report_figures_have_titles_labels_and_legends(rng, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'tilewise[calibrate]')")
    caps = make_captures(rng, steps=[0, 1], layers=[0, 1, 2], alphas=ALPHAS[:5])
    result = cal.search(caps, CANDIDATES[:4])
    budget = float(np.median(result.error("rel_mse")))
    strategy = result.select(budget=budget, metric="rel_mse")
    layers, values = report.density_grid(strategy, result.cost_model(), result.heads)
    fig = report.heatmap_figure(values, layers, "Density of the chosen windows averaged over steps")
    ax, bar = fig.axes
    assert ax.get_title() == "Density of the chosen windows averaged over steps"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("head", "layer")
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(h) for h in range(5)]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert "density" in bar.get_ylabel()
    np.testing.assert_array_equal(ax.images[0].get_array(), values)   # the picture is the data, cell by cell
    for (l, h) in itertools.product(range(3), range(5)):
        expected = np.mean([result.cost_model().density(strategy.window(s, l, h)) for s in (0, 1)])
        assert values[l, h] == pytest.approx(expected)

    fig = report.error_figure(result, "rel_mse", budget)
    ax = fig.axes[0]
    assert "Error vs sparsity" in ax.get_title() and "sparsity" in ax.get_xlabel() and "rel_mse" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [x.split()[0] for x in legend] == [report.format_window(w) for w in result.candidates] + ["budget"]
    assert ax.get_yscale() == "log"

    written = report.write_report(tmp_path / "r", strategy, result, metric="rel_mse", budget=budget)
    assert {p.name for p in written} == {"search.npz", "summary.txt", "heatmap_all.png", "heatmap_step0.png",
                                         "heatmap_step1.png", "error_vs_sparsity.png"}
    image = read_png(tmp_path / "r" / "heatmap_all.png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image[..., :3].std() > 0.05   # not blank


def test_report_without_matplotlib_writes_the_summary_and_says_so(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    result = cal.search(make_captures(rng, steps=[0], layers=[0], alphas=ALPHAS[:2]), CANDIDATES[:2])
    written = report.write_report(tmp_path, result.select(argmin=True), result)
    assert {p.name for p in written} == {"search.npz", "summary.txt"}
    assert "matplotlib is not installed" in (tmp_path / "summary.txt").read_text()


# ---------------------------------------------------------------------------------------------------------------
# CLI

def write_captures(rng, directory, steps=range(3), layers=range(2), alphas=ALPHAS[::2], **geometry_kw):
    g = geometry(text_len=geometry_kw.pop("text_len", 6), **geometry_kw)
    for step, layer in itertools.product(steps, layers):
        q, k, v = planted_qkv(rng, alphas)
        cal.save_capture(directory, step=step, layer=layer, q=q, k=k, v=v, geometry=g)
    return directory


def test_cli_end_to_end(rng, tmp_path, capsys):
    caps = write_captures(rng, tmp_path / "caps")
    out, fv, rep = tmp_path / "strategy.json", tmp_path / "mask_strategy.json", tmp_path / "report"
    rc = cli.main(["--captures", str(caps), "--candidates", "1x1x1,1x2x2,2x1x1,1x3x3", "--budget", "1e-3",
                   "--metric", "rel_mse", "--skip-steps", "1", "--out", str(out), "--fastvideo-out", str(fv),
                   "--report-dir", str(rep), "--frame-threshold", "0.05"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for bar in ("check captures", "calibrate", "frames", "report"):   # tqdm bars, run to the end
        assert f"{bar}: 100%" in captured.err, (bar, captured.err)
    assert "speedup" in captured.out and "frame patterns" in captured.out
    s = Strategy.load(out)
    assert s.skip_steps == 1 and s.windows_for(0, 1, 4) == [(2, 2, 2)] * 4
    # heads: global everywhere, local in h only, local in t, local in t and h (PLANTED[::2]); 1x3x3 is 1x2x2 here
    assert s.windows_for(2, 1, 4) == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert set(s.frame_patterns) == {0, 1} and s.frame_pattern(0, 0) is None
    assert Strategy.load(fv, grid=(2, 2, 2)).windows == s.windows
    for name in ("summary.txt", "heatmap_all.png", "heatmap_step0.png", "heatmap_step2.png",
                 "error_vs_sparsity.png", "search.npz"):
        assert (rep / name).exists(), name
    summary = (rep / "summary.txt").read_text()
    step0 = next(line for line in summary.splitlines() if line.split()[:1] == ["0"])
    assert "0.0%" in step0 and "1.00x" in step0 and "dense 8" in step0
    # re-select from the saved errors with another rule, without captures: the search's metric (rel_mse) is kept
    saved = cal.SearchResult.load(rep / "search.npz")
    assert saved.metric == "rel_mse"
    rc = cli.main(["--errors", str(rep / "search.npz"), "--argmin", "--out", str(tmp_path / "argmin.json"),
                   "--quiet"])
    assert rc == 0 and capsys.readouterr().err == ""
    argmin = Strategy.load(tmp_path / "argmin.json")
    assert argmin.search["metric"] == "rel_mse" and argmin == saved.select(argmin=True, metric="rel_mse")
    assert argmin.window(2, 0, 0) != (2, 2, 2)


def test_cli_reselection_uses_the_metric_of_the_search_unless_given(rng, tmp_path, capsys):
    caps = write_captures(rng, tmp_path / "caps", steps=[0], layers=[0], alphas=ALPHAS)
    assert cli.main(["--captures", str(caps), "--candidates", "1x1x1,1x2x2,2x1x1,2x2x1", "--argmin", "--metric",
                     "l1", "--out", str(tmp_path / "s.json"), "--quiet"]) == 0
    errors = tmp_path / "s.search.npz"   # no --report-dir: the errors go next to --out
    result = cal.SearchResult.load(errors)
    assert result.metric == "l1"
    # a budget between the per-head l1 and mse errors: the two metrics choose differently
    budget = float(np.median(result.error("l1")))
    by_l1 = result.select(budget=budget, metric="l1")
    by_mse = result.select(budget=budget, metric="mse")
    assert by_l1.windows != by_mse.windows
    for args, expected in (([], by_l1), (["--metric", "mse"], by_mse), (["--metric", "l1"], by_l1)):
        out = tmp_path / "re.json"
        assert cli.main(["--errors", str(errors), "--budget", repr(budget), "--out", str(out), "--quiet", *args]) == 0
        assert Strategy.load(out).windows == expected.windows, args
    capsys.readouterr()


def test_cli_writes_the_errors_before_anything_that_can_still_fail(rng, tmp_path, capsys, monkeypatch):
    caps = write_captures(rng, tmp_path / "caps", steps=[0, 1], layers=[0])
    rep = tmp_path / "report"

    def broken(*a, **kw):
        raise OSError(28, "No space left on device", str(rep / "summary.txt"))

    monkeypatch.setattr(report, "write_report", broken)
    rc = cli.main(["--captures", str(caps), "--candidates", "1x1x1,1x2x2", "--argmin", "--out",
                   str(tmp_path / "s.json"), "--report-dir", str(rep), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "No space left on device" in err and "Traceback" not in err
    result = cal.SearchResult.load(rep / "search.npz")   # the finished search survived
    assert result.keys == [(0, 0), (1, 0)] and np.isfinite(result.mse).all() and (result.mse > 0).all()
    monkeypatch.undo()
    assert cli.main(["--errors", str(rep / "search.npz"), "--argmin", "--out", str(tmp_path / "s2.json"),
                     "--quiet"]) == 0
    assert Strategy.load(tmp_path / "s2.json") == result.select(argmin=True)


@pytest.mark.parametrize("args, words", [
    (["--budget", "abc"], "invalid --budget = abc"),
    (["--budget", "-1"], "invalid --budget = -1"),
    (["--candidates", "3x3", "--argmin"], "invalid --candidates = 3x3"),
    (["--candidates", "", "--argmin"], "invalid --candidates = (empty)"),
    (["--candidates", " , ", "--argmin"], "invalid --candidates =  , "),
    ([], "--budget X"),
    (["--argmin", "--skip-steps", "1.5"], "invalid --skip-steps = 1.5"),
    (["--argmin", "--num-steps", "0"], "invalid --num-steps = 0: expected an integer >= 1"),
    (["--argmin", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_errors(tmp_path, capsys, args, words):
    base = ["--captures", str(tmp_path), "--out", str(tmp_path / "s.json")]
    if "--candidates" not in args:
        base += ["--candidates", "1x1x1"]
    assert cli.main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tilewise: error: ") and words in err, err


def run_cli(capsys, *args):
    rc = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("flag, make, words", [
    ("--out", lambda d: d / "missing" / "s.json", "invalid --out = {p}: no such directory"),
    ("--out", lambda d: d, "invalid --out = {p}: a directory"),
    ("--fastvideo-out", lambda d: d / "file.txt" / "fv.json", "invalid --fastvideo-out = {p}: not a directory"),
    ("--report-dir", lambda d: d / "file.txt", "invalid --report-dir = {p}: a file"),
    ("--report-dir", lambda d: d / "file.txt" / "deeper", "is a file"),
])
def test_cli_refuses_unwritable_outputs_before_the_search(rng, tmp_path, capsys, monkeypatch, flag, make, words):
    caps = write_captures(rng, tmp_path / "caps", steps=[0], layers=[0])
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(cli, "search", lambda *a, **kw: pytest.fail("the search ran"))
    path = make(tmp_path)
    outputs = {"--out": tmp_path / "s.json", flag: path}
    rc, err = run_cli(capsys, "--captures", caps, "--candidates", "1x1x1", "--argmin", "--quiet",
                      *itertools.chain(*outputs.items()))
    assert rc == 2 and words.format(p=path) in err, err
    assert not (tmp_path / "s.json").exists()


def test_cli_refuses_candidates_fastvideo_cannot_hold_before_the_search(rng, tmp_path, capsys, monkeypatch):
    # grid 3x3x3 (latent 6x12x12, tile 2x4x4): 2 along h is an even window smaller than the grid
    caps = tmp_path / "caps"
    q, k, v = (rng.standard_normal((1, 6 * 12 * 12 + 4, 2, 8)).astype(np.float32) for _ in range(3))
    cal.save_capture(caps, step=0, layer=0, q=q, k=k, v=v, geometry=cal.Geometry(latent=(6, 12, 12), tile=(2, 4, 4)))
    monkeypatch.setattr(cli, "search", lambda *a, **kw: pytest.fail("the search ran"))
    base = ["--captures", caps, "--argmin", "--out", tmp_path / "s.json", "--quiet"]
    rc, err = run_cli(capsys, *base, "--candidates", "1x1x1,3x2x3", "--fastvideo-out", tmp_path / "fv.json")
    assert rc == 2, err
    for words in ("invalid candidate 3x2x3 in --candidates", "grid 3x3x3", "even window 2 along h", "use 3"):
        assert words in err, (words, err)
    # an even window that covers the whole axis means the same in both formats; 4 >= 3 is clamped to 3 (odd)
    monkeypatch.undo()
    rc, err = run_cli(capsys, *base, "--candidates", "1x1x1,3x4x3", "--fastvideo-out", tmp_path / "fv.json")
    assert rc == 0, err
    # without --fastvideo-out the even window is fine
    rc, err = run_cli(capsys, *base, "--candidates", "3x2x3")
    assert rc == 0, err
    # re-selecting from errors whose candidates FastVideo cannot hold is refused before anything is written
    (tmp_path / "s.json").unlink()
    rc, err = run_cli(capsys, "--errors", tmp_path / "s.search.npz", "--argmin", "--out", tmp_path / "s.json",
                      "--fastvideo-out", tmp_path / "fv2.json")
    assert rc == 2 and "invalid candidate 3x2x3 in the candidates of" in err, err
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "fv2.json").exists()


def corrupt(case, caps):
    """Spoils the capture directory `caps` (one capture, step 0 layer 0) in one way; returns the words the error
    must contain."""
    manifest = caps / "step0000_layer000_sample000.json"
    m = json.loads(manifest.read_text())
    q = caps / m["q"]
    if case == "empty npy":
        q.write_bytes(b"")
        return [str(manifest), '"q"', q.name, "not a complete .npy array"]
    if case == "truncated npy":
        q.write_bytes(q.read_bytes()[:-100])
        return [str(manifest), '"q"', q.name, "not a complete .npy array"]
    if case == "missing npy":
        q.unlink()
        return [str(manifest), '"q"', "does not exist"]
    if case == "non-UTF-8 json":
        manifest.write_bytes(b'{"format": "tilewise-capture", "step": 0, "note": "\xff\xfe"}')
        return [str(manifest), "not UTF-8"]
    if case == "malformed json":
        manifest.write_text(manifest.read_text()[:-20])
        return [str(manifest), "not valid JSON"]
    if case == "missing latent":
        del m["latent"]
        manifest.write_text(json.dumps(m))
        return [str(manifest), '"latent" is missing']
    if case == "bad tile":
        m["tile"] = [2, "4", 4]
        manifest.write_text(json.dumps(m))
        return [str(manifest), '"tile" = [2, "4", 4]', "three integers >= 1"]
    if case == "text_len above capacity":
        m["text_len"] = [9]
        manifest.write_text(json.dumps(m))
        return [str(manifest), "\"text_len\" = [9]", "<= 8"]
    if case == "latent above the sequence":
        m["latent"] = [8, 8, 8]
        manifest.write_text(json.dumps(m))
        return [str(manifest), '"latent" = [8, 8, 8]', "T*H*W = 512"]
    if case == "negative step":
        m["step"] = -1
        manifest.write_text(json.dumps(m))
        return [str(manifest), '"step" = -1', "integer >= 0"]
    if case == "NaN in k":
        k = np.load(caps / m["k"])
        k[0, 3, 1, 2] = np.nan
        k[0, 5, 0, 0] = np.inf
        np.save(caps / m["k"], k)
        return [str(manifest), '"k" = ' + m["k"], "2 NaN or Inf value(s)"]
    raise AssertionError(case)


CORRUPTIONS = ["empty npy", "truncated npy", "missing npy", "non-UTF-8 json", "malformed json", "missing latent",
               "bad tile", "text_len above capacity", "latent above the sequence", "negative step", "NaN in k"]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_cli_names_the_file_and_field_of_a_bad_capture(rng, tmp_path, capsys, monkeypatch, case):
    caps = write_captures(rng, tmp_path / "caps", steps=[0], layers=[0])   # S = 256 video + 8 text
    words = corrupt(case, caps)
    monkeypatch.setattr(cli, "search", lambda *a, **kw: pytest.fail("the search ran"))
    rc, err = run_cli(capsys, "--captures", caps, "--candidates", "1x1x1", "--argmin", "--out", tmp_path / "s.json")
    assert rc == 2 and err.startswith("tilewise: error: invalid capture"), err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "not npz", "truncated", "foreign npz",
                                  "missing array", "wrong shape", "NaN errors"])
def test_cli_names_a_bad_errors_file(rng, tmp_path, capsys, case):
    path = tmp_path / "search.npz"
    result = cal.search(make_captures(rng, steps=[0, 1], layers=[0], alphas=ALPHAS[:2]), CANDIDATES[:2])
    result.save(path)
    arrays = dict(np.load(path))
    words = {"missing": "does not exist", "directory": "a directory", "empty": "not an npz archive",
             "not npz": "not an npz archive", "truncated": "not an npz archive", "foreign npz": "tilewise-search",
             "missing array": "'l1", "wrong shape": '"energy": shape (3,)', "NaN errors": "NaN or Inf"}[case]
    if case == "missing":
        path.unlink()
    elif case == "directory":
        path.unlink()
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "not npz":
        path.write_text("step,layer\n0,0\n")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif case == "foreign npz":
        np.savez(path, meta=np.array(json.dumps({"format": "other"})), x=np.ones(3))
    elif case == "missing array":
        np.savez(path, **{k: v for k, v in arrays.items() if k != "l1"})
    elif case == "wrong shape":
        np.savez(path, **dict(arrays, energy=rng.standard_normal(3)))
    elif case == "NaN errors":
        mse = arrays["mse"].copy()
        mse[1, 0, 1] = np.nan
        np.savez(path, **dict(arrays, mse=mse))
    rc, err = run_cli(capsys, "--errors", path, "--argmin", "--out", tmp_path / "s.json")
    assert rc == 2 and err.startswith("tilewise: error: invalid "), err
    assert str(path) in err and words in err, (words, err)
    assert not (tmp_path / "s.json").exists()


def test_select_refuses_nan_errors(rng):
    result = cal.search(make_captures(rng, steps=[0, 1], layers=[0], alphas=ALPHAS[:2]), CANDIDATES[:2])
    result.mse[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"\(1, 0\) are NaN or Inf"):
        result.select(budget=1.0)


def test_check_finite_refuses_in_memory_captures_with_the_step_named(rng):
    caps = make_captures(rng, steps=[0, 3], layers=[2], alphas=ALPHAS[:2])
    check_finite(caps)
    caps[1].v[0, 0, 0, 0] = -np.inf
    with pytest.raises(ValueError, match='step 3 layer 2 sample 0: "v" holds 1 NaN or Inf'):
        check_finite(caps)


def test_cli_entry_points(tmp_path, monkeypatch, capsys):
    from tilewise import _cli

    monkeypatch.setattr(sys, "argv", ["tilewise", "calibrate", "--help"])
    with pytest.raises(SystemExit) as info:
        _cli.main()
    assert info.value.code == 0 and "--candidates" in capsys.readouterr().out
    env = {"PYTHONPATH": str(ROOT / "python"), **{k: v for k, v in __import__("os").environ.items()
                                                   if k != "PYTHONPATH"}}
    p = subprocess.run([sys.executable, "-m", "tilewise.calibrate", "--out", str(tmp_path / "s.json")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "tilewise: error: give exactly one of --captures" in p.stderr


# ---------------------------------------------------------------------------------------------------------------
# torch (skipped where torch is not installed)

def test_torch_reduction_matches_numpy(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch reduction path is untested here")
    from tilewise.calibrate import _backend

    a, b = (rng.standard_normal((2, 33, 3, 8)).astype(np.float32) for _ in range(2))
    for layout in ("bshd", "bhsd"):
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        sq_t, ab_t = _backend.TorchOps().diff_sums(ta, tb, layout)
        sq_n, ab_n = _backend.NumpyOps().diff_sums(a, b, layout)
        np.testing.assert_allclose(sq_t.numpy(), sq_n, rtol=1e-5)
        np.testing.assert_allclose(ab_t.numpy(), ab_n, rtol=1e-5)
    q, k, v = planted_qkv(rng, ALPHAS[:2])
    ev_t = cal.evaluate(*(torch.from_numpy(x) for x in (q, k, v)), geometry(), CANDIDATES[:2])
    ev_n = cal.evaluate(q, k, v, geometry(), CANDIDATES[:2])
    np.testing.assert_allclose(ev_t.mse, ev_n.mse, rtol=1e-6)


def test_torch_reduction_over_many_chunks_leaves_its_inputs_alone(rng, monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch reduction path is untested here")
    from tilewise.calibrate import _backend

    monkeypatch.setattr(_backend, "CHUNK_ELEMENTS", 100)  # 4 rows of [2, s, 3, 8] per chunk: 9 chunks
    for dtype in (np.float32, np.float64):
        a, b = (rng.standard_normal((2, 3, 33, 8)).astype(dtype) for _ in range(2))  # bhsd
        ta, tb = torch.from_numpy(a.copy()), torch.from_numpy(b.copy())
        sq_t, ab_t = _backend.TorchOps().diff_sums(ta, tb, "bhsd")
        sq_n, ab_n = _backend.NumpyOps().diff_sums(a, b, "bhsd")
        assert torch.equal(ta, torch.from_numpy(a)) and torch.equal(tb, torch.from_numpy(b))
        np.testing.assert_allclose(sq_t.numpy(), sq_n, rtol=1e-5)
        np.testing.assert_allclose(ab_t.numpy(), ab_n, rtol=1e-5)
        np.testing.assert_allclose(_backend.TorchOps().square_sums(ta, "bhsd").numpy(),
                                   _backend.NumpyOps().square_sums(a, "bhsd"), rtol=1e-5)
    x = torch.from_numpy(rng.standard_normal((2, 33, 3, 8)).astype(np.float32)).bfloat16()
    np.testing.assert_allclose(_backend.TorchOps().square_sums(x, "bshd").numpy(),
                               _backend.NumpyOps().square_sums(x.float().numpy(), "bshd"), rtol=1e-5)


def test_torch_cuda_evaluate_matches_cpu(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed: the CUDA search path is untested here")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA search path is untested here")
    q, k, v = planted_qkv(rng, ALPHAS, dtype=np.float16)
    ev_n = cal.evaluate(q, k, v, geometry(), CANDIDATES)
    ev_t = cal.evaluate(*(torch.from_numpy(x).cuda() for x in (q, k, v)), geometry(), CANDIDATES)
    np.testing.assert_allclose(ev_t.rel_mse, ev_n.rel_mse, rtol=0.1, atol=1e-5)
