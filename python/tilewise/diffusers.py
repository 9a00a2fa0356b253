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
explicit attention mask where the model normally has none, context parallelism, or a dtype / head dim that
the device's tilewise backend does not take, e.g. float32 on CUDA) runs on the original processor.

Strategy (`strategy=`):
- one window for every step, layer and head: `(kt, kh, kw)`, or one per head `[(kt, kh, kw), ...]`, or
  `{"window": ..., "tile": (tt, th, tw)}`;
- a table (a dict, or a path to a JSON file) keyed `"<step>_<layer>_<head>"` -> `[kt, kh, kw]` (FastVideo's
  mask_strategy key style, windows in tilewise's semantics). A head without a key gets a full window
  (dense); a (step, layer) with no key at all runs on the original (dense) processor;
- a calibrated strategy from tilewise.calibrate (a `Strategy`, or its JSON file or dict with
  `"format": "tilewise-strategy"`): its windows, its `default` for missing keys, its tile, and its per-layer
  frame patterns (`tilewise.attention_tile`, with tile (1, th, tw)) from step `skip_steps` on.

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

import functools
import json
import os
import re

import torch

import tilewise
from tilewise import _api, _torch  # noqa: F401  (registers the custom op)

__all__ = ["enable", "disable", "set_timesteps", "controller", "tap", "Controller"]

FULL_WINDOW = (1 << 20, 1 << 20, 1 << 20)  # larger than any tile grid: clamped to the whole axis by the core
_KEY = re.compile(r"^(\d+)_(\d+)_(\d+)$")


# --- strategy ---

class _Strategy:
    """A parsed strategy: one window for everything, or per-(step, layer, head) windows (+ frame patterns)."""

    def __init__(self, strategy, tile):
        self.tile = None if tile is None else _api._triple("tile", tile)
        self.window = None      # tuple of triples (one, or one per head): the same for every step and layer
        self.table = None       # {(step, layer): {head: (kt, kh, kw)}}
        self.default = None     # window of heads without a key; None = dense
        self.frames = {}        # layer -> (global_frames, radius), from step skip_steps on
        self.skip_steps = 0
        if isinstance(strategy, (str, os.PathLike)):
            try:
                with open(strategy) as f:
                    strategy = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"invalid strategy = {str(strategy)!r}: expected a window, a table or the path of a "
                                 f"JSON strategy file ({e})") from None
        if isinstance(strategy, dict) and strategy.get("format") == "tilewise-strategy":
            from tilewise.calibrate.strategy import Strategy
            strategy = Strategy.from_json(strategy)
        if hasattr(strategy, "windows_for"):  # a tilewise.calibrate.Strategy
            self._calibrated(strategy)
        elif isinstance(strategy, dict) and "window" in strategy:
            unknown = set(strategy) - {"window", "tile"}
            if unknown:
                raise ValueError(f"invalid strategy keys {sorted(unknown)}: expected 'window' and optionally 'tile'")
            if "tile" in strategy:
                self._set_tile(strategy["tile"])
            self.window = self._single(strategy["window"])
        elif isinstance(strategy, dict):
            self.table = {}
            for key, value in strategy.items():
                m = _KEY.match(str(key))
                if not m:
                    raise ValueError(f"invalid strategy key {key!r}: expected '<step>_<layer>_<head>', e.g. '0_12_3'")
                step, layer, head = (int(x) for x in m.groups())
                self.table.setdefault((step, layer), {})[head] = _api._triple(f"strategy[{key!r}]", value)
        else:
            self.window = self._single(strategy)
        if self.tile is None:
            self.tile = (6, 8, 8)

    def _set_tile(self, tile) -> None:
        tile = _api._triple("tile", tile)
        if self.tile is not None and self.tile != tile:
            raise ValueError(f"invalid tile = {self.tile}: the strategy was made for tile {tile}")
        self.tile = tile

    @staticmethod
    def _single(window):
        try:
            return _api._pattern_params("sliding_tile", window=window).windows
        except (TypeError, ValueError):
            raise ValueError(f"invalid strategy = {window!r}: expected a window (kt, kh, kw), one window per head, "
                             "{'window': ..., 'tile': ...}, or a table (dict or JSON path) keyed "
                             "'<step>_<layer>_<head>'") from None

    def _calibrated(self, s) -> None:
        if s.tile is not None:
            self._set_tile(s.tile)
        self.table = {}
        for (step, layer, head), w in s.windows.items():
            self.table.setdefault((step, layer), {})[head] = tuple(w)
        self.default = None if s.default is None else tuple(s.default)
        self.frames = dict(s.frame_patterns)
        self.skip_steps = int(s.skip_steps)

    @property
    def per_step(self) -> bool:
        return self.table is not None

    def call(self, step, layer: int, heads: int):
        """The pattern of one call: ("sta", windows) (one window, or one per head), ("frame", (g, r)), or None
        for the original (dense) processor."""
        if self.table is None:
            return ("sta", self.window)
        entry = self.table.get((step, layer))
        if entry:
            bad = [h for h in entry if h >= heads]
            if bad:
                raise ValueError(f"invalid strategy key '{step}_{layer}_{bad[0]}': layer {layer} has {heads} heads")
            fill = self.default or FULL_WINDOW
            return ("sta", tuple(entry.get(h, fill) for h in range(heads)))
        if layer in self.frames and step >= self.skip_steps:
            return ("frame", self.frames[layer])
        if self.default is not None:
            return ("sta", (self.default,))
        return None


class _Tap:
    """The strategy of a tap: ("tap", None) at the selected (step, layer), None (the original processor)
    elsewhere. steps / layers: indices (a range stays a range), None = all."""

    per_step = True

    def __init__(self, steps, layers, tile):
        self.steps = steps if steps is None or isinstance(steps, range) else frozenset(int(s) for s in steps)
        self.layers = None if layers is None else frozenset(int(l) for l in layers)
        self.tile = (6, 8, 8) if tile is None else _api._triple("tile", tile)

    def call(self, step, layer: int, heads: int):
        if (self.steps is None or step in self.steps) and (self.layers is None or layer in self.layers):
            return ("tap", None)
        return None


# --- model families ---

class _Family:
    name = ""

    @staticmethod
    def latent(config, shape):
        raise NotImplementedError

    @staticmethod
    def attention_modules(model):
        raise NotImplementedError


class _Hunyuan(_Family):
    name = "HunyuanVideo"

    @staticmethod
    def latent(config, shape):  # hidden_states [B, C, F, H, W]
        return (shape[2] // config.patch_size_t, shape[3] // config.patch_size, shape[4] // config.patch_size)

    @staticmethod
    def attention_modules(model):
        return [b.attn for b in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]


class _Wan(_Family):
    name = "Wan"

    @staticmethod
    def latent(config, shape):  # hidden_states [B, C, F, H, W]
        pt, ph, pw = config.patch_size
        return (shape[2] // pt, shape[3] // ph, shape[4] // pw)

    @staticmethod
    def attention_modules(model):
        return [b.attn1 for b in model.blocks]


class _CogVideoX(_Family):
    name = "CogVideoX"

    @staticmethod
    def latent(config, shape):  # hidden_states [B, F, C, H, W]
        pt = config.patch_size_t or 1
        return (shape[1] // pt, shape[3] // config.patch_size, shape[4] // config.patch_size)

    @staticmethod
    def attention_modules(model):
        return [b.attn1 for b in model.transformer_blocks]


def _family(model):
    from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel
    for cls, fam in ((HunyuanVideoTransformer3DModel, _Hunyuan), (WanTransformer3DModel, _Wan),
                     (CogVideoXTransformer3DModel, _CogVideoX)):
        if isinstance(model, cls):
            return fam
    raise TypeError(f"model: expected a HunyuanVideoTransformer3DModel, WanTransformer3DModel or "
                    f"CogVideoXTransformer3DModel, or a pipeline holding one as .transformer, got "
                    f"{type(model).__name__}")


# --- controller ---

_CUDA_HEAD_DIMS = (64, 96, 128)
_hopper: dict = {}


@torch.compiler.assume_constant_result
def _is_hopper(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _hopper:
        _hopper[index] = torch.cuda.get_device_capability(index)[0] == 9
    return _hopper[index]


class Controller:
    """tilewise's state on one transformer: strategy, recorded latent grid and step, original processors.

    `calls` counts eager attention calls by route ("tilewise" or "original"); calls inside a torch.compile
    graph are not counted."""

    def __init__(self, model, family, strategy: _Strategy, timesteps):
        self.model, self.family, self.strategy = model, family, strategy
        self.latent = None
        self.step = None
        self.timesteps = None
        self.calls = {"tilewise": 0, "original": 0}
        self.tap = None     # hook(layer, step, q, k, v, geometry) of a tap (see tap())
        self.modules = family.attention_modules(model)
        self.originals = [m.processor for m in self.modules]
        self._hook = None
        self.specs = None   # the current pattern of each layer
        self._specs = {}    # (step, latent) -> specs
        if timesteps is not None:
            self.set_timesteps(timesteps)

    def set_timesteps(self, timesteps) -> None:
        values = timesteps.detach().float().cpu().reshape(-1).tolist() if isinstance(timesteps, torch.Tensor) \
            else [float(t) for t in timesteps]
        if not values:
            raise ValueError("timesteps: expected at least one timestep")
        self.timesteps = values

    def step_index(self, timestep) -> int:
        if self.timesteps is None:
            raise RuntimeError("tilewise.diffusers: the strategy has per-step windows but the denoising timesteps are "
                               "unknown: pass timesteps=pipe.scheduler.timesteps to enable(), call "
                               "tilewise.diffusers.set_timesteps(), or enable(pipe) on the pipeline")
        if timestep is None:
            raise ValueError("timestep: the transformer was called without a timestep, so the step index of the "
                             "per-step strategy is unknown")
        t = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        ts = self.timesteps
        return min(range(len(ts)), key=lambda i: abs(ts[i] - t))  # nearest; the first one on ties

    def _pre_hook(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        latent = tuple(int(x) for x in self.family.latent(module.config, hidden.shape))
        if self.strategy.per_step:
            timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
            self.step, self.specs = _step_and_specs(self, timestep, latent)
        elif self.specs is None:
            self.specs = tuple(self.strategy.call(None, layer, m.heads) for layer, m in enumerate(self.modules))
        self.latent = latent

    def specs_for(self, step: int, latent) -> tuple:
        """The pattern of every layer at `step` (None where dense: the model's own attention runs)."""
        key = (step, latent)
        if key not in self._specs:
            tile = self.strategy.tile
            grid = [-(-latent[a] // tile[a]) for a in range(3)]  # tiles per axis
            specs = []
            for layer, m in enumerate(self.modules):
                spec = self.strategy.call(step, layer, m.heads)
                if spec is not None and spec[0] == "sta" and all(w[a] >= grid[a] for w in spec[1] for a in range(3)):
                    spec = None  # every head dense (e.g. a calibrated skip step)
                specs.append(spec)
            self._specs[key] = tuple(specs)
        return self._specs[key]

    def route(self, processor, attn, hidden_states, n_video: int):
        """The pattern of this call (see _Strategy.call), or None to run the original processor. A tapped call
        that tilewise cannot run raises (a capture must not silently miss calls)."""
        latent = self.latent
        if latent is None or latent[0] * latent[1] * latent[2] != n_video:
            return None
        spec = self.specs[processor.layer]
        if spec is None or _supported(processor, attn, hidden_states):
            return spec
        if spec[0] == "tap":
            raise RuntimeError(f"tilewise.diffusers: cannot tap layer {processor.layer} at step {self.step}: "
                               f"{_unsupported_reason(processor, attn, hidden_states)}")
        return None

    def tap_attention(self, layer: int, q, k, v, text_len, text_position: str):
        """A tapped call: hook(layer, step, q, k, v, geometry), whose result (or tilewise's dense attention when
        it returns None) is the attention output."""
        from tilewise.calibrate.capture import Geometry
        lengths = None if text_len is None else tuple(int(x) for x in text_len.tolist())  # one small copy
        geometry = Geometry(latent=self.latent, tile=self.strategy.tile, text_len=lengths,
                            text_position=text_position)
        out = self.tap(layer, self.step, q, k, v, geometry)
        if out is None:
            out = tilewise.dense_attention(q, k, v, text_len=text_len, **geometry.kwargs())
        return out

    def count(self, route: str) -> None:
        if not torch.compiler.is_compiling():
            self.calls[route] += 1


def _parallel(processor) -> bool:
    return getattr(processor, "_parallel_config", None) is not None or \
        getattr(processor.original, "_parallel_config", None) is not None


def _supported(processor, attn, hidden_states) -> bool:
    """Whether tilewise runs this call on its device: no context parallelism, and a dtype (and on CUDA a head
    dim and a Hopper GPU) that the device's backend takes."""
    if _parallel(processor):
        return False
    device, dtype = hidden_states.device, hidden_states.dtype
    if device.type == "cuda":
        return dtype in (torch.bfloat16, torch.float16) and attn.inner_dim // attn.heads in _CUDA_HEAD_DIMS \
            and _is_hopper(device)
    return device.type == "cpu" and dtype in _torch._DTYPES


def _unsupported_reason(processor, attn, hidden_states) -> str:
    device, dtype = hidden_states.device, hidden_states.dtype
    if _parallel(processor):
        return "context parallelism is enabled on it"
    if device.type == "cuda":
        if dtype not in (torch.bfloat16, torch.float16):
            return f"it runs in {dtype}, and tilewise's CUDA backend takes torch.bfloat16 or torch.float16"
        if attn.inner_dim // attn.heads not in _CUDA_HEAD_DIMS:
            return f"its head dim is {attn.inner_dim // attn.heads}; tilewise's CUDA backend takes 64, 96 or 128"
        return f"{device} is not a Hopper GPU (sm_90), which tilewise's CUDA kernel needs"
    return f"it runs on {device} in {dtype}; tilewise runs on CPU ({', '.join(map(str, _torch._DTYPES))}) " \
        "and CUDA tensors"


@torch.compiler.disable
def _step_and_specs(ctrl: Controller, timestep, latent):
    """Eager even under torch.compile (it reads the timestep on the host): the step and the layers' patterns,
    so that compiled code depends on the patterns (guards on their values), not on the step number."""
    step = ctrl.step_index(timestep)
    return step, ctrl.specs_for(step, latent)


# --- processors ---

class _Processor:
    _attention_backend = None
    _parallel_config = None

    def __init__(self, ctrl: Controller, layer: int, original):
        self.ctrl, self.layer, self.original = ctrl, layer, original

    def _attention(self, q, k, v, spec, text_len, text_position):
        tile = self.ctrl.strategy.tile
        if spec[0] == "tap":  # the hook point: q, k, v after norms and RoPE, where the attention runs
            return self.ctrl.tap_attention(self.layer, q, k, v, text_len, text_position)
        if spec[0] == "sta":
            return tilewise.sliding_tile_attention(q, k, v, latent=self.ctrl.latent, tile=tile, window=spec[1],
                                                   text_len=text_len, text_position=text_position)
        g, r = spec[1]  # frame pattern: one frame per tile, so that every block is dense or empty
        return tilewise.attention_tile(q, k, v, latent=self.ctrl.latent, tile=(1, tile[1], tile[2]), global_frames=g,
                                       radius=r, text_len=text_len, text_position=text_position)


def _rope_prefix(x, n: int, emb):
    """diffusers' apply_rotary_emb on the first n positions of a [B, S, H, D] tensor; the rest unchanged."""
    from diffusers.models.embeddings import apply_rotary_emb
    if n == x.shape[1]:
        return apply_rotary_emb(x, emb, sequence_dim=1)
    return torch.cat([apply_rotary_emb(x[:, :n], emb, sequence_dim=1), x[:, n:]], dim=1)


def _project_heads(attn, x, projections, norm_q, norm_k):
    """q, k, v of `x` as [B, S, heads, D] through three projections, with the optional q/k norms applied."""
    q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projections)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class HunyuanVideoProcessor(_Processor):
    """HunyuanVideo's joint attention ([video | text], text padding from the attention mask) on tilewise."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_video = hidden_states.shape[1]
        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        spec = self.ctrl.route(self, attn, hidden_states, n_video)
        batch, seq = hidden_states.shape[0], n_video + n_text
        mask_ok = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.numel() == batch * seq)
        if spec is None or not mask_ok or (encoder_hidden_states is not None and n_text == 0):
            self.ctrl.count("original")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.ctrl.count("tilewise")

        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single_stream else hidden_states
        q, k, v = _project_heads(attn, x, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:  # RoPE on the video positions only
            q = _rope_prefix(q, n_video, image_rotary_emb)
            k = _rope_prefix(k, n_video, image_rotary_emb)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            added = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            eq, ek, ev = _project_heads(attn, encoder_hidden_states, added, attn.norm_added_q, attn.norm_added_k)
            q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)

        # The mask keeps the first n_video + text_len[b] keys: its text part counts the valid text tokens.
        text_len = None if attention_mask is None or n_text == 0 else \
            attention_mask.reshape(batch, seq)[:, n_video:].sum(dim=1, dtype=torch.int32)
        out = self._attention(q, k, v, spec, text_len, "last").flatten(2, 3).to(q.dtype)

        if encoder_hidden_states is None:
            return out, None
        out, text_out = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out


def _rotate_pairs(x, cos, sin):
    """Wan's RoPE: rotates (x[2i], x[2i+1]) by the angle whose cosine is cos[2i] and sine sin[2i+1]."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(x.dtype)


class WanProcessor(_Processor):
    """Wan's video self-attention (attn1) on tilewise; anything else goes to the original processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        spec = None
        if encoder_hidden_states is None and attention_mask is None and not kwargs and attn.add_k_proj is None:
            spec = self.ctrl.route(self, attn, hidden_states, hidden_states.shape[1])
        if spec is None:
            self.ctrl.count("original")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        self.ctrl.count("tilewise")

        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if rotary_emb is not None:
            q, k = _rotate_pairs(q, *rotary_emb), _rotate_pairs(k, *rotary_emb)
        out = self._attention(q, k, v, spec, None, "last").flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class CogVideoXProcessor(_Processor):
    """CogVideoX's joint attention ([text | video], all text valid) on tilewise."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        spec = None
        if attention_mask is None:
            spec = self.ctrl.route(self, attn, hidden_states, hidden_states.shape[1])
        if spec is None:
            self.ctrl.count("original")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.ctrl.count("tilewise")

        n_text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = x.shape[0]
        if type(self.original).__name__.startswith("Fused"):
            q, k, v = torch.split(attn.to_qkv(x), attn.to_qkv.out_features // 3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb
            q[:, :, n_text:] = apply_rotary_emb(q[:, :, n_text:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, n_text:] = apply_rotary_emb(k[:, :, n_text:], image_rotary_emb)
        # [B, S, H, D] views: the output comes back [B, S, H, D] contiguous, ready for the reshape.
        out = self._attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec,
                              None, "first")
        out = out.reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, out = out.split([n_text, out.shape[1] - n_text], dim=1)
        return out, text_out


_PROCESSORS = {_Hunyuan: HunyuanVideoProcessor, _Wan: WanProcessor, _CogVideoX: CogVideoXProcessor}


# --- enable / disable ---

def _transformers(model):
    """(transformers, pipeline or None) of a transformer or a pipeline (Wan 2.2 has transformer_2 too)."""
    if hasattr(model, "transformer") and not isinstance(model, torch.nn.Module):
        found = [m for m in (getattr(model, "transformer", None), getattr(model, "transformer_2", None))
                 if m is not None]
        return found, model
    return [model], None


def controller(transformer) -> Controller | None:
    """The Controller that enable() attached to a transformer, or None."""
    return getattr(transformer, "_tilewise", None)


def enable(model, strategy, *, tile=None, timesteps=None):
    """Routes the self-attention of a diffusers video transformer (or of a pipeline's transformer(s)) through
    tilewise. Returns the Controller (for a pipeline with two transformers, the first one's).

    strategy: a window (kt, kh, kw), one window per head, {"window": ..., "tile": ...}, a table (dict or JSON
    path) keyed "<step>_<layer>_<head>" -> [kt, kh, kw], or a calibrated strategy (tilewise.calibrate.Strategy,
    or its JSON file / dict with "format": "tilewise-strategy").
    tile: (tt, th, tw), default (6, 8, 8) or the calibrated strategy's.
    timesteps: the denoising timesteps of the run, for per-step tables (not needed when `model` is a
    pipeline: its scheduler's set_timesteps is hooked)."""
    return _enable(model, _Strategy(strategy, tile), timesteps)


def tap(model, hook, *, steps=None, layers=None, tile=None, timesteps=None) -> Controller:
    """Calls hook(layer, step, q, k, v, geometry) at each self-attention call of the selected denoising steps
    and layers (indices, None = all) of a transformer or a pipeline's transformer(s): q, k, v are [B, S, H, D]
    after QK norms and RoPE, geometry a tilewise.calibrate.Geometry (latent, tile, per-batch text_len, text
    position). The hook returns the call's attention output (a tensor like q) or None for tilewise's dense
    attention; every other call runs the model's own processor, so the model's output stays the dense one.
    The step comes from the timestep as for per-step strategies (hence timesteps=, or a pipeline). A tapped call
    that tilewise cannot run (e.g. float32 on CUDA) raises. Undo with disable(model). Used by
    tilewise.calibrate.capture."""
    for t in _transformers(model)[0]:
        if controller(t) is not None:
            raise ValueError(f"model: tilewise is enabled on this {type(t).__name__}: call "
                             "tilewise.diffusers.disable() first (a tap needs the model's dense attention)")
    ctrl = _enable(model, _Tap(steps, layers, tile), timesteps)
    for t in _transformers(model)[0]:
        controller(t).tap = hook
    return ctrl


def _enable(model, parsed, timesteps) -> Controller:
    transformers, pipe = _transformers(model)
    ctrls = []
    for t in transformers:
        family = _family(t)
        if controller(t) is not None:
            disable(t)
        ctrl = Controller(t, family, parsed, timesteps)
        cls = _PROCESSORS[family]
        for layer, (module, original) in enumerate(zip(ctrl.modules, ctrl.originals)):
            module.set_processor(cls(ctrl, layer, original))
        ctrl._hook = t.register_forward_pre_hook(ctrl._pre_hook, with_kwargs=True)
        t._tilewise = ctrl
        ctrls.append(ctrl)
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        _hook_scheduler(pipe.scheduler, ctrls)
        if timesteps is None and getattr(pipe.scheduler, "timesteps", None) is not None:
            for c in ctrls:
                c.set_timesteps(pipe.scheduler.timesteps)
    return ctrls[0]


def disable(model) -> None:
    """Puts back the original attention processors and removes tilewise's hooks (a no-op if not enabled)."""
    transformers, pipe = _transformers(model)
    for t in transformers:
        ctrl = controller(t)
        if ctrl is None:
            continue
        for module, original in zip(ctrl.modules, ctrl.originals):
            module.set_processor(original)
        ctrl._hook.remove()
        del t._tilewise
    if pipe is not None and getattr(pipe, "scheduler", None) is not None and \
            "set_timesteps" in vars(pipe.scheduler) and hasattr(pipe.scheduler.set_timesteps, "_tilewise"):
        del pipe.scheduler.set_timesteps


def set_timesteps(model, timesteps) -> None:
    """Sets the denoising timesteps (the step index of per-step strategies is the nearest one's index)."""
    transformers, _ = _transformers(model)
    for t in transformers:
        ctrl = controller(t)
        if ctrl is None:
            raise ValueError(f"model: tilewise is not enabled on this {type(t).__name__}: call enable() first")
        ctrl.set_timesteps(timesteps)


def _hook_scheduler(scheduler, ctrls) -> None:
    if "set_timesteps" in vars(scheduler) and hasattr(scheduler.set_timesteps, "_tilewise"):
        del scheduler.set_timesteps
    original = scheduler.set_timesteps

    @functools.wraps(original)  # keeps the signature, which pipelines inspect for `timesteps` / `sigmas`
    def set_timesteps_and_record(*args, **kwargs):
        result = original(*args, **kwargs)
        for c in ctrls:
            c.set_timesteps(scheduler.timesteps)
        return result

    set_timesteps_and_record._tilewise = True
    scheduler.set_timesteps = set_timesteps_and_record
