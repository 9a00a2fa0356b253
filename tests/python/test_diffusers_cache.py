"""diffusers 0.42's step-skipping caches (FirstBlockCache, MagCache, TaylorSeer, FasterCache) compose with
tilewise.diffusers: with tilewise enabled under a per-(step, layer, head) table, a denoising loop with the cache
runs, some transformer work is skipped, and every attention call that does run gets the true denoising step (read
from the timestep, never from counting calls)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (see requirements-torch.txt)")

import tilewise.diffusers as twd  # noqa: E402
from diffusers import (  # noqa: E402
    FasterCacheConfig,
    FirstBlockCacheConfig,
    FlowMatchEulerDiscreteScheduler,
    MagCacheConfig,
    TaylorSeerCacheConfig,
)
from tiny_models import TILE, build, seed  # noqa: E402,F401  (seed is a fixture)

STEPS = 8
# Windows differ per step (and per layer): a call given the wrong step would get the wrong windows.
TABLE = {f"{s}_{l}_{h}": [1 + (s + h) % 2, 1 + (s + l) % 2, 1] for s in range(STEPS) for l in range(2)
         for h in range(2)}


def _caches(scheduler_holder):
    return {
        "first_block": FirstBlockCacheConfig(threshold=10.0),  # a large threshold: every later step is skipped
        "mag": MagCacheConfig(threshold=10.0, max_skip_steps=2, retention_ratio=0.0, num_inference_steps=STEPS,
                              mag_ratios=[1.0] * STEPS),
        "taylor_seer": TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=1, max_order=1,
                                             taylor_factors_dtype=torch.float32),
        # FasterCache skips a layer's attention at every step in spatial_attention_timestep_skip_range except each
        # block_skip_range-th, reusing the outputs of the last two computed steps; a range that takes in the first
        # timestep (1000) makes diffusers skip before anything is cached (faster_cache.py: state.cache is None,
        # also without tilewise), hence its default (-1, 681) and (-1, 901) here: step 0 computes, then every
        # second step.
        "faster": FasterCacheConfig(spatial_attention_block_skip_range=2,
                                    spatial_attention_timestep_skip_range=(-1, 901),
                                    current_timestep_callback=lambda: scheduler_holder["t"],
                                    attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
                                    tensor_format="BCFHW"),
        # The same with classifier-free guidance: the batch is [uncond, cond], and on the steps where FasterCache
        # approximates the unconditional branch the transformer runs on the conditional half only (batch 1).
        "faster_cfg": FasterCacheConfig(spatial_attention_block_skip_range=2,
                                        spatial_attention_timestep_skip_range=(-1, 901),
                                        unconditional_batch_skip_range=2,
                                        unconditional_batch_timestep_skip_range=(-1, 901),
                                        current_timestep_callback=lambda: scheduler_holder["t"],
                                        attention_weight_callback=lambda _: 0.5, is_guidance_distilled=False,
                                        tensor_format="BCFHW"),
    }


@pytest.mark.parametrize("cache", ["first_block", "mag", "taylor_seer"])
def test_cache_composes_and_steps_stay_true(seed, cache, monkeypatch):
    _denoise_and_check(cache, monkeypatch)


@pytest.mark.parametrize("cache", ["faster", "faster_cfg"])
def test_fastercache_composes_and_steps_stay_true(seed, cache, monkeypatch):
    seen = _denoise_and_check(cache, monkeypatch)
    # Exactly the steps FasterCache computes (see _caches) run attention, both layers each; the others reuse.
    assert sorted((s, layer) for s, _, layer, _ in seen) == [(s, l) for s in (0, 2, 4, 6) for l in range(2)]


def _denoise_and_check(cache, monkeypatch):
    """A denoising loop of the tiny Wan under tilewise (the per-step TABLE) and `cache`: checks the properties
    of the module docstring and returns (loop step, controller step, layer, windows) of every tilewise call."""
    model, inputs = build("wan")
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(STEPS)
    holder = {"t": int(scheduler.timesteps[0])}
    ctrl = twd.enable(model, strategy=TABLE, tile=TILE, timesteps=scheduler.timesteps)
    model.enable_cache(_caches(holder)[cache])

    seen = []  # (loop step, controller step, windows) of every attention call that runs on tilewise
    real = ctrl.modules[0].processor._attention

    def spy(self, q, k, v, spec, text_len, text_position):
        seen.append((holder["i"], self.ctrl.step, self.layer, spec[1]))
        return type(self)._attention(self, q, k, v, spec, text_len, text_position)

    for m in ctrl.modules:
        monkeypatch.setattr(m.processor, "_attention", spy.__get__(m.processor))
    assert real is not None

    x = inputs["hidden_states"]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            holder["i"], holder["t"] = i, int(t)
            with model.cache_context("cond"):  # the caches keep their state per context (CFG branch)
                pred = model(**dict(inputs, hidden_states=x, timestep=t.expand(x.shape[0]))).sample
            x = scheduler.step(pred, t, x).prev_sample
    out = x
    assert torch.isfinite(out).all()
    calls = ctrl.calls["tilewise"]
    assert 0 < calls <= 2 * STEPS
    if cache != "taylor_seer":  # TaylorSeer predicts whole blocks' outputs; its attention calls may all run here
        assert calls < 2 * STEPS, f"{cache}: expected some attention calls skipped, got {calls} of {2 * STEPS}"
    for loop_step, step, layer, windows in seen:
        assert step == loop_step  # the true denoising step, also after skipped steps
        assert windows == tuple(tuple(TABLE[f"{step}_{layer}_{h}"]) for h in range(2))
    model.disable_cache()
    twd.disable(model)
    return seen
