"""diffusers integration: run the self-attention of HunyuanVideo, Wan and CogVideoX transformers on tilewise.

    import tilewise.diffusers
    tilewise.diffusers.enable(pipe, strategy=(3, 3, 3))       # or a transformer; disable(pipe) undoes it
    video = pipe(prompt, ...).frames[0]

`enable` installs a tilewise attention processor on every self-attention module of the transformer (keeping
the original processors, which `disable` puts back) and a forward pre-hook on the transformer that records
the latent grid (from `hidden_states` and the model's patch sizes) and, for per-step strategies, the step
index (from the `timestep` argument). Each processor reproduces the math of the model's own processor (QKV
projections, QK norms, RoPE, text concatenation, output projections) and calls tilewise for the attention:

| model | modules | sequence | text_len |
|---|---|---|---|
| HunyuanVideoTransformer3DModel | `transformer_blocks[i].attn`, then `single_transformer_blocks[i].attn` | video, then text | from the text padding mask (per batch, on the device) |
| WanTransformer3DModel | `blocks[i].attn1` (cross-attention `attn2` stays on the original) | video only | - |
| CogVideoXTransformer3DModel | `transformer_blocks[i].attn1` | text, then video | all text valid |

Layers are numbered in that order from 0 (for HunyuanVideo the single-stream blocks follow the dual-stream
ones). A call whose geometry does not match (no recorded latent, a video length other than T*H*W, an
explicit attention mask where the model normally has none, ring attention, or a dtype / head dim that the
device's tilewise backend does not take, e.g. float32 on CUDA) runs on the original processor.

Context parallelism (diffusers 0.42, Ulysses): after `enable`, `transformer.enable_parallelism(config=
ContextParallelConfig(ulysses_degree=N), cp_plan=tilewise.diffusers.cp_plan(transformer))` splits the sequence
with diffusers' own hooks and process groups, and tilewise's processors run `tilewise.parallel`'s all-to-alls on
diffusers' Ulysses group (each rank: the whole sequence for heads / N heads, windows indexed by global head).
`cp_plan` is the model's own for Wan and tilewise's for HunyuanVideo and CogVideoX (diffusers has none). Under it
a call that falls back to a model processor without context parallelism (CogVideoX's) raises instead of
computing a wrong, rank-local attention; ring attention (ring_degree > 1) stays on diffusers' processors.

Strategy (`strategy=`):
- one window for every step, layer and head: `(kt, kh, kw)`, or one per head `[(kt, kh, kw), ...]`, or
  `{"window": ..., "tile": (tt, th, tw)}`;
- a table (a dict, or a path to a JSON file) keyed `"<step>_<layer>_<head>"` -> `[kt, kh, kw]` (FastVideo's
  mask_strategy key style, windows in tilewise's semantics). A head without a key gets a full window
  (dense); a (step, layer) with no key at all runs on the original (dense) processor;
- a calibrated strategy from tilewise.calibrate (a `Strategy`, or its JSON file or dict with
  `"format": "tilewise-strategy"`): its windows, its `default` for missing keys, its tile, and its per-layer
  frame patterns (`tilewise.attention_tile`, with tile (1, th, tw)) from step `skip_steps` on.

Precision (`enable(..., precision=)`): "fp8" runs every tilewise call in FP8 (docs/semantics.md §11; the CPU
and Hopper backends, forward only), "native" in the model's dtype, None (default) what the
strategy says: a calibrated strategy's FP8 heads, a (step, layer) running FP8 when all its heads chose it.

Windows are in tiles and may exceed the tile grid (the core clamps them). The tile defaults to (6, 8, 8). With
a per-step strategy, a layer whose heads all have windows covering the grid runs on the original processor.

Step index: for a per-step table, the step is the index of the denoising timestep nearest to the `timestep`
argument of the transformer's forward (the largest value when the model gets per-token timesteps), in the
list of timesteps of the run. That list comes from `enable(..., timesteps=pipe.scheduler.timesteps)`, from
`set_timesteps()`, or, when `enable` is given a pipeline, from its scheduler: `enable(pipe)` wraps
`pipe.scheduler.set_timesteps` so that every pipeline call records its schedule. Counting calls would be wrong
with classifier-free guidance run as two calls, and with cache methods that skip steps; the timestep is not.
Reading it costs one device-to-host copy per transformer call (not per attention call), and only for
per-step tables.

Tap (for calibration): `tap(model, hook, steps=, layers=)` installs the same processors, which at the selected
(step, layer) call `hook(layer, step, q, k, v, geometry)` with the attention inputs after QK norms and RoPE
([B, S, H, D], where the attention would run) and a `tilewise.calibrate.Geometry`, and use what it returns (a
tensor like q; tilewise's dense attention when it returns None) as the attention output. Other calls run the
original processors. `tilewise.calibrate.capture` is built on it.

torch.compile: the processors trace without a graph break (`torch.compile(transformer, fullgraph=True)` works
with a fixed strategy). With a per-step strategy the step is read eagerly (a graph break in the pre-hook),
and the compiled code is specialised on the layers' windows: one recompilation per distinct set of windows
(raise torch._dynamo.config.recompile_limit for tables whose steps all differ).
"""
from __future__ import annotations

import importlib as _importlib
import pkgutil as _pkgutil

from tilewise.calibrate.strategy import FULL_WINDOW, Strategy  # noqa: F401
from tilewise.diffusers._controller import Controller, controller, disable, enable, set_timesteps, tap  # noqa: F401
from tilewise.diffusers._family import FAMILIES, Family, cp_plan, family_of, register  # noqa: F401

__all__ = ["enable", "disable", "set_timesteps", "controller", "tap", "cp_plan", "Controller", "Family", "register",
           "FAMILIES"]

# Every public module of this package is a model family (registers itself): a new family is one new file.
for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")
