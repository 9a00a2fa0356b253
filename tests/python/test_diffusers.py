"""tilewise.diffusers on tiny, randomly initialised HunyuanVideo, Wan and CogVideoX transformers (built from
configs, no weights): with windows that cover the grid the output equals the model's own attention; sparse
windows change it; disable() restores it exactly; per-(step, layer, head) strategies follow the timestep; and
the patched models run under torch.compile. CPU tests use the CPU backend (float32); the CUDA tests need a
Hopper GPU."""
import inspect
import json
import types

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (see requirements-torch.txt)")

import tilewise.diffusers as twd  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from tiny_models import (  # noqa: E402,F401  (seed is a fixture)
    COVER,
    FAMILIES,
    LATENT,
    TILE,
    Spy,
    build,
    hopper,
    num_attention,
    run,
    seed,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_covering_window_equals_model_attention_and_disable_restores(seed, family):
    model, inputs = build(family)
    ref = run(model, inputs)
    ctrl = twd.enable(model, strategy={"window": COVER, "tile": TILE})
    out = run(model, inputs)
    assert ctrl.calls == {"tilewise": num_attention(model), "original": 0}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    twd.enable(model, strategy=(1, 1, 1), tile=TILE)  # re-enabling replaces the strategy
    sparse = run(model, inputs)
    assert (sparse - ref).abs().max() > 1e-3
    twd.disable(model)
    assert twd.controller(model) is None and model._forward_pre_hooks == {}
    assert torch.equal(run(model, inputs), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_windows_larger_than_the_grid_and_per_head_windows(seed, family):
    model, inputs = build(family)
    ref = run(model, inputs)
    twd.enable(model, strategy=(100, 100, 100), tile=TILE)  # clamped by the core: dense
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)
    twd.enable(model, strategy=[(1, 1, 1), COVER], tile=TILE)  # head 0 sparse, head 1 dense
    per_head = run(model, inputs)
    twd.enable(model, strategy=[(1, 1, 1), (1, 1, 1)], tile=TILE)
    both_sparse = run(model, inputs)
    assert (per_head - ref).abs().max() > 1e-4 and (per_head - both_sparse).abs().max() > 1e-4
    twd.disable(model)


def test_hunyuan_text_padding_becomes_text_len(seed):
    model, inputs = build("hunyuan")
    twd.enable(model, strategy=COVER, tile=TILE)
    padded = run(model, inputs)
    # Changing the padding tokens' embeddings changes nothing: they are never attended to as keys (the
    # padding rows themselves are computed, and the video output does not depend on them).
    ehs = inputs["encoder_hidden_states"].clone()
    ehs[1, 3:] = torch.randn(3, 16)
    out = run(model, inputs, encoder_hidden_states=ehs)
    torch.testing.assert_close(out[1], padded[1], rtol=1e-5, atol=1e-5)
    twd.disable(model)
    torch.testing.assert_close(run(model, inputs, encoder_hidden_states=ehs), out, rtol=1e-5, atol=1e-5)


TABLE = {  # Wan has 2 layers of 2 heads
    "0_0_0": [1, 1, 1], "0_0_1": [1, 2, 1],   # step 0: layer 0 per-head, layer 1 none (dense)
    "1_1_1": [2, 1, 1],                       # step 1: layer 1 head 1 (head 0 missing: full window)
}                                             # step 2: nothing (dense)
FULL = twd.FULL_WINDOW


def test_strategy_table_follows_the_timestep_not_the_call_count(seed, monkeypatch):
    model, inputs = build("wan")
    ref = {t: run(model, inputs, timestep=torch.tensor([t, t])) for t in (900, 600, 300)}
    spy = Spy(monkeypatch)
    ctrl = twd.enable(model, strategy=TABLE, tile=TILE, timesteps=[900.0, 600.0, 300.0])
    # Out of order, repeated (CFG as two calls), and near but not equal (a bf16-rounded timestep).
    for t, step, windows in [(600, 1, [((FULL), (2, 1, 1))]), (900, 0, [((1, 1, 1), (1, 2, 1))]),
                             (300, 2, []), (600, 1, [(FULL, (2, 1, 1))]), (897.5, 0, [((1, 1, 1), (1, 2, 1))])]:
        out = run(model, inputs, timestep=torch.tensor([t, t]))
        assert ctrl.step == step
        assert spy.take() == windows
        if step == 2:
            assert torch.equal(out, ref[300])  # every layer on the original processor
        else:
            assert (out - ref[900 if step == 0 else 600]).abs().max() > 1e-4
    assert ctrl.calls == {"tilewise": 4, "original": 6}
    twd.disable(model)


def test_strategy_json_file_and_calibrated_format(seed, monkeypatch, tmp_path):
    model, inputs = build("wan")
    spy = Spy(monkeypatch)
    path = tmp_path / "mask_strategy.json"
    path.write_text(json.dumps(TABLE))
    twd.enable(model, strategy=str(path), tile=TILE, timesteps=torch.tensor([900, 600, 300]))
    run(model, inputs, timestep=torch.tensor([900, 900]))
    assert spy.take() == [((1, 1, 1), (1, 2, 1))]

    # tilewise.calibrate's format: explicit windows, a default for missing keys, frame patterns per layer.
    calibrated = {"format": "tilewise-strategy", "version": 1, "latent": list(LATENT), "tile": list(TILE),
                  "grid": [3, 2, 2], "default": None, "skip_steps": 1,
                  "windows": {"0_0_0": [3, 2, 2], "0_0_1": [3, 2, 2], "0_1_0": [3, 2, 2], "0_1_1": [3, 2, 2],
                              "1_0_0": [1, 2, 2], "1_0_1": [2, 2, 2]},
                  "frame_patterns": {"1": [1, 0]}}
    ctrl = twd.enable(model, strategy=calibrated, timesteps=[900, 600])
    assert ctrl.strategy.tile == TILE
    run(model, inputs, timestep=torch.tensor([900, 900]))  # step 0 (skip step): dense windows -> original
    assert spy.take() == [] and spy.frames == [] and ctrl.calls["original"] == 2
    run(model, inputs, timestep=torch.tensor([600, 600]))  # step 1: layer 0 windows, layer 1 frame pattern
    assert spy.take() == [((1, 2, 2), (2, 2, 2))]
    assert spy.frames == [(1, 0, (1, 4, 4))]
    twd.disable(model)


def test_enable_on_a_pipeline_hooks_its_scheduler(seed, monkeypatch):
    model, inputs = build("wan")
    scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    spy = Spy(monkeypatch)
    ctrl = twd.enable(pipe, strategy=TABLE, tile=TILE)
    assert "sigmas" in inspect.signature(scheduler.set_timesteps).parameters  # pipelines inspect it
    scheduler.set_timesteps(3)
    assert ctrl.timesteps == pytest.approx(scheduler.timesteps.tolist())
    run(model, inputs, timestep=scheduler.timesteps[1].expand(2))
    assert ctrl.step == 1 and spy.take() == [(FULL, (2, 1, 1))]
    twd.disable(pipe)
    assert "set_timesteps" not in vars(scheduler) and twd.controller(model) is None


def test_calls_that_do_not_match_stay_on_the_original_processor(seed):
    model, inputs = build("wan")
    ctrl = twd.enable(model, strategy=(1, 1, 1), tile=TILE)
    attn = model.blocks[0].attn1
    x = torch.randn(2, 10, attn.inner_dim)
    with torch.no_grad():
        before = ctrl.originals[0](attn, x)
        assert ctrl.latent is None and torch.equal(attn(x), before)  # no latent recorded yet
        run(model, inputs)
        assert torch.equal(attn(x), before)  # 10 tokens, not 3*8*8
    assert ctrl.calls["original"] == 2
    twd.disable(model)


def test_float32_stream_under_autocast_runs_on_tilewise(seed, monkeypatch):
    """HunyuanVideo's attention sees a float32 residual stream even under bf16 autocast (its LayerNorms run in
    float32 there). On CUDA, where tilewise takes no float32, the route must ask for autocast's dtype, or a
    training step silently falls back to dense attention (it did, on the H200). The CPU backend takes float32, so
    the CUDA refusal is played here: float32 is refused outside autocast and runs on tilewise (in bf16) inside,
    close to the float32 result."""
    from tilewise.diffusers import _controller

    model, inputs = build("hunyuan")
    ctrl = twd.enable(model, strategy=(1, 1, 1), tile=TILE)
    want = run(model, inputs)  # float32 on the CPU backend
    assert ctrl.calls == {"tilewise": 2, "original": 0}
    real = _controller._refusal
    monkeypatch.setattr(_controller, "_refusal",
                        lambda device, dtype, head_dim, precision="native":
                        "float32 is not taken (as on CUDA)" if dtype == "f32" else real(device, dtype, head_dim,
                                                                                          precision))
    run(model, inputs)
    assert ctrl.calls == {"tilewise": 2, "original": 2}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(model, inputs)
    assert ctrl.calls == {"tilewise": 4, "original": 2}
    assert float((got.double() - want.double()).norm() / want.double().norm()) < 0.05
    twd.disable(model)


def test_errors(seed):
    model, inputs = build("wan")
    with pytest.raises(ValueError, match="strategy key 'x_1_2'"):
        twd.enable(model, strategy={"x_1_2": [1, 1, 1]})
    with pytest.raises(ValueError, match="invalid strategy = 5"):
        twd.enable(model, strategy=5)
    with pytest.raises(ValueError, match="invalid strategy = 'missing.json'.*JSON strategy file"):
        twd.enable(model, strategy="missing.json")
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        twd.enable(torch.nn.Linear(2, 2), strategy=(3, 3, 3))
    with pytest.raises(ValueError, match="not enabled"):
        twd.set_timesteps(model, [1.0])
    with pytest.raises(ValueError, match="invalid early_start = 1: expected True or False"):
        twd.enable(model, strategy=(1, 1, 1), tile=TILE, early_start=1)
    twd.enable(model, strategy={"0_0_5": [1, 1, 1]}, tile=TILE, timesteps=[900])
    with pytest.raises(ValueError, match="'0_0_5': layer 0 has 2 heads"):
        run(model, inputs)
    twd.enable(model, strategy={"0_0_0": [1, 1, 1]}, tile=TILE)
    with pytest.raises(RuntimeError, match="timesteps are unknown"):
        run(model, inputs)
    twd.disable(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_from_enable_and_from_a_calibrated_strategy(seed, family, monkeypatch):
    """precision="fp8" reaches every tilewise call (docs/semantics.md §11: close to, not equal to, the model's
    attention); a calibrated strategy's FP8 heads make a (step, layer) FP8 when all its heads are."""
    from tilewise.calibrate import Strategy

    model, inputs = build(family)
    ref = run(model, inputs)
    spy = Spy(monkeypatch)
    ctrl = twd.enable(model, strategy=COVER, tile=TILE, precision="fp8")
    out = run(model, inputs)
    layers = num_attention(model)
    assert spy.precisions == ["fp8"] * layers and ctrl.calls == {"tilewise": layers, "original": 0}
    assert 1e-4 < ((out - ref).norm() / ref.norm()).item() < 0.1

    fp8 = {(0, 0, 0), (0, 0, 1), (0, 1, 0)}  # layer 0 both heads, layer 1 one head of two
    strategy = Strategy(windows={(0, layer, h): COVER for layer in range(layers) for h in range(2)}, latent=LATENT,
                        tile=TILE, fp8=fp8)
    for precision, expected in ((None, ["fp8"]), ("fp8", ["fp8"] * layers), ("native", [])):
        spy.precisions.clear()
        twd.enable(model, strategy=strategy, timesteps=[900.0, 600.0], precision=precision)
        run(model, inputs)  # timestep 900: step 0. Dense windows in native precision run the model's attention.
        assert spy.precisions == expected, precision
    with pytest.raises(ValueError, match="invalid precision = 'fp16': expected None"):
        twd.enable(model, strategy=COVER, precision="fp16")
    twd.disable(model)


@hopper
def test_fp8_on_cuda_runs_the_hopper_fp8_kernel(seed, monkeypatch):
    """precision="fp8" on a Hopper GPU runs tilewise's FP8 kernel (issue 18): every call in FP8, close to the
    native run (§11.5: ~5% per call) and not equal to it. Head dim 64: the Hopper backend's smallest."""
    model, inputs = build("wan", head_dim=64, device="cuda", dtype=torch.bfloat16)
    twd.enable(model, strategy=COVER, tile=TILE)
    native = run(model, inputs).float()
    spy = Spy(monkeypatch)
    ctrl = twd.enable(model, strategy=COVER, tile=TILE, precision="fp8")
    out = run(model, inputs).float()
    layers = num_attention(model)
    assert spy.precisions == ["fp8"] * layers and ctrl.calls == {"tilewise": layers, "original": 0}
    assert torch.isfinite(out).all()
    assert 1e-4 < ((out - native).norm() / native.norm()).item() < 0.1
    twd.disable(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph(seed, family):
    model, inputs = build(family)
    twd.enable(model, strategy=[(1, 1, 1), (2, 1, 2)], tile=TILE)
    eager = run(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(run(compiled, inputs), eager)
    twd.disable(model)


def test_torch_compile_with_a_per_step_table(seed):
    model, inputs = build("wan")
    twd.enable(model, strategy=TABLE, tile=TILE, timesteps=[900, 600, 300])
    eager = {t: run(model, inputs, timestep=torch.tensor([t, t])) for t in (900, 600, 300)}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")  # the step read is a graph break; windows change per step
    for t in (600, 900, 300, 600):
        torch.testing.assert_close(run(compiled, inputs, timestep=torch.tensor([t, t])), eager[t])
    twd.disable(model)


@hopper
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16(seed, family):
    model, inputs = build(family, head_dim=64, device="cuda", dtype=torch.bfloat16)
    ref = run(model, inputs)
    ctrl = twd.enable(model, strategy=COVER, tile=TILE)
    out = run(model, inputs)
    assert ctrl.calls["tilewise"] == num_attention(model)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())  # bf16 rounding only
    assert rel < 2e-2
    twd.enable(model, strategy=(1, 1, 1), tile=TILE)
    sparse = run(model, inputs)
    assert float((sparse.float() - ref.float()).norm() / ref.float().norm()) > 2 * rel
    torch._dynamo.reset()
    compiled = run(torch.compile(model, fullgraph=True), inputs)
    assert float((compiled.float() - sparse.float()).norm() / sparse.float().norm()) < 2e-2
    twd.disable(model)
    assert torch.equal(run(model, inputs), ref)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_fused_qkv_projections(seed, family):
    model, inputs = build(family)
    model.fuse_qkv_projections()
    ref = run(model, inputs)
    ctrl = twd.enable(model, strategy=COVER, tile=TILE)
    attn = ctrl.modules[0]
    assert hasattr(attn, "to_qkv") and (getattr(attn, "fused_projections", False)
                                        or type(ctrl.originals[0]).__name__.startswith("Fused"))
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)
    assert ctrl.calls["tilewise"] == num_attention(model)
    twd.disable(model)
