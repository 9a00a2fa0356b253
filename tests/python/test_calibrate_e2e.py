"""Calibration end to end on tiny, randomly initialised diffusers transformers (CPU, float32): a live capture
during a denoising loop (the generation stays dense) -> search result -> strategy JSON -> tilewise.diffusers.enable
with that file -> the same loop runs the strategy's windows at every (step, layer, head). Also: the capture hook
sees the geometry of each family (HunyuanVideo's text padding as text_len, CogVideoX's text first, Wan video
only), q, k, v files written during the capture give the same errors through the disk search, and misuse fails
with a clear message."""
import json
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (see requirements-torch.txt)")

import tilewise.calibrate as cal  # noqa: E402
import tilewise.diffusers as twd  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from tiny_models import FAMILIES, LATENT, TILE, Spy, build, denoise, hopper, num_attention, seed  # noqa: E402,F401

GRID = (3, 2, 2)
CANDIDATES = [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 1), (3, 1, 2)]
STEPS = 4
SKIP = 1


def pipeline(family):
    model, inputs = build(family)
    return types.SimpleNamespace(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler()), inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_search_strategy_enable(seed, family, tmp_path, monkeypatch):
    pipe, inputs = pipeline(family)
    model, scheduler = pipe.transformer, pipe.scheduler
    layers, heads = num_attention(model), model.config.num_attention_heads
    ref = denoise(model, inputs, scheduler, STEPS)

    # 1. Capture: errors measured live (and q, k, v written, to check against the disk search).
    with cal.capture(pipe, candidates=CANDIDATES, skip_steps=SKIP, tile=TILE, out_dir=tmp_path / "caps") as cap:
        captured = denoise(model, inputs, scheduler, STEPS)
    torch.testing.assert_close(captured, ref, rtol=1e-5, atol=1e-5)  # the generation stays dense
    assert twd.controller(model) is None and "set_timesteps" not in vars(scheduler)  # hooks removed
    assert cap.controller.calls == {"tilewise": (STEPS - SKIP) * layers, "original": SKIP * layers}

    # 2. Search result: every evaluated (step, layer), skip steps listed.
    result = cap.result()
    assert result.keys == [(s, l) for s in range(SKIP, STEPS) for l in range(layers)]
    assert result.skipped == [(s, l) for s in range(SKIP) for l in range(layers)]
    assert result.mse.shape == (len(result.keys), len(CANDIDATES), heads) and result.grid == GRID
    assert np.all(result.mse > 0) and np.all(np.isfinite(result.mse))
    from_disk = cal.search(cal.load_captures(tmp_path / "caps"), CANDIDATES, skip_steps=SKIP)
    assert from_disk.keys == result.keys
    np.testing.assert_allclose(from_disk.mse, result.mse, rtol=1e-6)
    np.testing.assert_allclose(from_disk.energy, result.energy, rtol=1e-6)

    # 3. Strategy JSON: a key per captured (step, layer, head); skip steps dense.
    budget = float(np.median(result.error("rel_mse")))
    strategy = result.select(budget=budget, metric="rel_mse")
    path = tmp_path / "strategy.json"
    strategy.save(path)
    saved = json.loads(path.read_text())
    assert set(saved["windows"]) == {f"{s}_{l}_{h}" for s in range(STEPS) for l in range(layers) for h in range(heads)}
    assert all(saved["windows"][f"{s}_{l}_{h}"] == list(GRID)
               for s in range(SKIP) for l in range(layers) for h in range(heads))
    assert saved["skip_steps"] == SKIP and saved["tile"] == list(TILE)
    chosen = {tuple(w) for k, w in saved["windows"].items() if int(k.split("_")[0]) >= SKIP}
    assert chosen - {GRID} and chosen <= set(CANDIDATES) | {GRID}

    # 4. Generate with the strategy: each step's tilewise calls use the strategy's per-head windows.
    ctrl = twd.enable(model, strategy=str(path), timesteps=scheduler.timesteps)
    spy = Spy(monkeypatch)
    seen = {}

    def record(i, t):
        seen[i] = (ctrl.step, spy.take())

    out = denoise(model, inputs, scheduler, STEPS, after_step=record)
    sparse_calls = 0
    for step in range(STEPS):
        expected = []
        for layer in range(layers):
            windows = tuple(strategy.windows_for(step, layer, heads))
            if any(w != GRID for w in windows):  # a layer whose heads are all dense runs the model's attention
                expected.append(windows)
        assert seen[step] == (step, expected)
        sparse_calls += len(expected)
    assert sparse_calls > 0 and ctrl.calls == {"tilewise": sparse_calls, "original": STEPS * layers - sparse_calls}
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-6
    twd.disable(model)


def test_capture_selected_steps_and_layers_averages_calls(seed):
    model, inputs = build("wan")
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps
    other = dict(inputs, encoder_hidden_states=torch.randn_like(inputs["encoder_hidden_states"]))

    def generate():  # two calls per step (classifier-free guidance as two calls)
        outs = []
        with torch.no_grad():
            for t in timesteps:
                for inp in (inputs, other):
                    outs.append(model(**dict(inp, timestep=t.expand(2))).sample)
        return outs

    ref = generate()
    with cal.capture(model, steps=[0, 2], layers=[1], candidates="1x1x1,3x2x2,9x1x1", tile=TILE,
                     timesteps=timesteps) as cap:
        outs = generate()
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert sorted(cap.evaluations) == [(0, 1), (2, 1)] and all(len(v) == 2 for v in cap.evaluations.values())
    result = cap.result()
    assert result.candidates == [(1, 1, 1), GRID, (3, 1, 1)]  # clamped to the grid
    assert result.keys == [(0, 1), (2, 1)] and result.skipped == []
    assert np.all(result.mse[:, 1] == 0)  # the grid window is dense: not run, error 0
    np.testing.assert_allclose(result.mse[0], np.mean([e.mse for e in cap.evaluations[(0, 1)]], axis=0))
    strategy = result.select(argmin=True)
    assert sorted(strategy.windows) == [(s, 1, h) for s in (0, 2) for h in range(2)]


def test_capture_measures_fp8_per_head_and_enable_applies_it(seed, monkeypatch):
    """precisions=("native", "fp8"): each window is measured in FP8 too; a budget above FP8's error of the grid
    window makes every head FP8 where FP8 is modelled cheaper (fp8_cost 0.6; the measured default, 1.0, keeps the
    more accurate bf16), and the strategy runs every layer in FP8 (docs/semantics.md §11)."""
    model, inputs = build("wan")
    with cal.capture(model, candidates=[(1, 1, 1), GRID], tile=TILE, timesteps=[900.0],
                     precisions=("native", "fp8")) as cap:
        with torch.no_grad():
            model(**inputs)
    result = cap.result()
    assert result.candidate_precisions == ["native", "native", "fp8", "fp8"]
    err = result.error("rel_mse")
    assert (err[:, 1] == 0).all() and (0 < err[:, 3]).all() and (err[:, 3] < 1e-2).all()
    strategy = result.select(budget=float(err[:, 3].max()) * 2, metric="rel_mse", fp8_cost=0.6)
    assert strategy.fp8 == {(0, layer, h) for layer in range(2) for h in range(2)}
    spy = Spy(monkeypatch)
    twd.enable(model, strategy=strategy, timesteps=[900.0])
    with torch.no_grad():
        model(**inputs)
    assert spy.precisions == ["fp8", "fp8"]
    twd.disable(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_tap_sees_each_family_geometry(seed, family):
    model, inputs = build(family)
    ref = denoise(model, inputs, FlowMatchEulerDiscreteScheduler(), 2)
    seen = []

    def hook(layer, step, q, k, v, geometry):
        seen.append((layer, step, tuple(q.shape), geometry))
        assert k.shape == v.shape == q.shape
        return None  # tilewise's dense attention

    scheduler = FlowMatchEulerDiscreteScheduler()
    twd.tap(types.SimpleNamespace(transformer=model, scheduler=scheduler), hook, steps=[1])
    out = denoise(model, inputs, scheduler, 2)
    twd.disable(model)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    video = int(np.prod(LATENT))
    text, text_len, position = {"hunyuan": (6, (6, 3), "last"), "wan": (0, None, "last"),
                                "cogvideox": (7, None, "first")}[family]
    assert [(l, s) for l, s, _, _ in seen] == [(l, 1) for l in range(num_attention(model))]
    for _, _, shape, g in seen:
        assert shape == (2, video + text, model.config.num_attention_heads, model.config.attention_head_dim)
        assert (g.latent, g.tile, g.text_len, g.text_position, g.layout) == (LATENT, (6, 8, 8), text_len, position,
                                                                             "bshd")


def test_capture_errors(seed, monkeypatch):
    model, inputs = build("wan")
    with pytest.raises(ValueError, match="candidates= .* and/or out_dir="):
        cal.capture(model)
    with pytest.raises(ValueError, match="invalid window '3x3'"):
        cal.capture(model, candidates="3x3")
    twd.enable(model, strategy=(1, 1, 1), tile=TILE)
    with pytest.raises(ValueError, match="tilewise is enabled on this WanTransformer3DModel"):
        cal.capture(model, candidates=CANDIDATES)
    twd.disable(model)

    cap = cal.capture(model, candidates=CANDIDATES, tile=TILE, timesteps=[900.0])
    with pytest.raises(ValueError, match="no attention call was captured"):
        cap.result()
    monkeypatch.setattr(twd._controller, "_refusal", lambda *a: "it runs on cpu in torch.float32 (refused)")  # e.g. float32 on CUDA
    with pytest.raises(RuntimeError, match="cannot tap layer 0 at step 0: it runs on cpu in torch.float32"):
        with cap:
            denoise(model, inputs, FlowMatchEulerDiscreteScheduler(), 1)
    assert twd.controller(model) is None

    with cal.capture(model, out_dir="unused", tile=TILE, timesteps=[900.0]) as cap:
        pass
    with pytest.raises(ValueError, match="tilewise calibrate --captures unused"):
        cap.result()


@hopper
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_cuda_bf16(seed, family):
    model, inputs = build(family, head_dim=64, device="cuda", dtype=torch.bfloat16)
    pipe = types.SimpleNamespace(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
    ref = denoise(model, inputs, pipe.scheduler, 2)
    with cal.capture(pipe, candidates=CANDIDATES, tile=TILE) as cap:
        out = denoise(model, inputs, pipe.scheduler, 2)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 2e-2  # bf16 rounding only
    result = cap.result()
    assert result.keys == [(s, l) for s in range(2) for l in range(num_attention(model))]
    assert np.all(np.isfinite(result.mse)) and np.all(result.mse > 0)
