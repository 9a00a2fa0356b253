"""The controller of tilewise.diffusers: per-transformer state (strategy, recorded latent grid and step, original
processors), call routing, the processor base class, and enable / disable / tap. Model specifics live in one
module per family (hunyuan_video.py, wan.py, cogvideox.py), registered in _family.FAMILIES."""
from __future__ import annotations

import functools
from typing import Optional

import torch

import tilewise
from tilewise import _capi, _torch  # noqa: F401  (_torch registers the custom ops)
from tilewise.calibrate.strategy import FULL_WINDOW, Strategy
from tilewise.diffusers._family import family_of
from tilewise.geometry import Geometry


class _Tap:
    """The strategy of a tap: ("tap", None) at the selected (step, layer), None (the original processor)
    elsewhere. steps / layers: indices (a range stays a range), None = all."""

    per_step = True

    def __init__(self, steps, layers, tile):
        self.steps = steps if steps is None or isinstance(steps, range) else frozenset(int(s) for s in steps)
        self.layers = None if layers is None else frozenset(int(l) for l in layers)
        self.tile = (6, 8, 8) if tile is None else tilewise._args.triple("tile", tile)

    def pattern(self, step, layer: int, heads: int):
        if (self.steps is None or step in self.steps) and (self.layers is None or layer in self.layers):
            return ("tap", None)
        return None


DEFAULT_TILE = (6, 8, 8)


class Controller:
    """tilewise's state on one transformer: strategy, recorded latent grid and step, original processors.

    `calls` counts eager attention calls by route ("tilewise" or "original"); calls inside a torch.compile
    graph are not counted."""

    def __init__(self, model, family, strategy: Strategy, timesteps, parallel=None, precision=None):
        self.model, self.family, self.strategy = model, family, strategy
        self.precision = precision  # None: the strategy's (Strategy.precision); "native" / "fp8": every call
        # tilewise.parallel's options under context parallelism: load_balance (None = when heads differ), chunks,
        # sm_margin, exchange
        self.parallel = {"load_balance": None, "chunks": 1, "sm_margin": 0, "exchange": "nccl", **(parallel or {})}
        self.early_start = True  # enable(early_start=): families' hooks may issue the all-to-all before the call
        self.rotary_in_place = 0  # calls whose RoPE wrote q and k into the all-to-all's send buffer (HunyuanVideo)
        self.latent = None
        self.step = None
        self.timesteps = None
        self.calls = {"tilewise": 0, "original": 0}
        self.started_early = 0  # calls whose all-to-all a family's hook issued before the attention call
        self.tap = None     # hook(layer, step, q, k, v, geometry) of a tap (see tap())
        self.tile = strategy.tile or DEFAULT_TILE
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
            self.specs = tuple(self.spec(None, layer, m.heads) for layer, m in enumerate(self.modules))
        self.latent = latent

    def spec(self, step, layer: int, heads: int):
        """The pattern of a layer's calls at `step` (Strategy.pattern, None = the model's own attention) with the
        precision appended: (kind, params, precision)."""
        spec = self.strategy.pattern(step, layer, heads)
        if spec is None or spec[0] == "tap":
            return spec
        return (*spec, self.precision or self.strategy.precision(step, layer, heads))

    def specs_for(self, step: int, latent) -> tuple:
        """The pattern of every layer at `step` (None where dense: the model's own attention runs)."""
        key = (step, latent)
        if key not in self._specs:
            grid = _capi.tile_grid(latent, self.tile)
            specs = []
            for layer, m in enumerate(self.modules):
                spec = self.spec(step, layer, m.heads)
                if spec is not None and spec[0] == "sta" and spec[2] == "native" and \
                        all(_capi.effective_window(latent, self.tile, w) == grid for w in spec[1]):
                    spec = None  # every head dense (e.g. a calibrated skip step): FP8 ones stay on tilewise
                specs.append(spec)
            self._specs[key] = tuple(specs)
        return self._specs[key]

    def route(self, processor, attn, hidden_states, n_video: int):
        """The pattern of this call (see Strategy.pattern), or None to run the original processor. A tapped call
        that tilewise cannot run raises (a capture must not silently miss calls)."""
        latent = self.latent
        if latent is None or latent[0] * latent[1] * latent[2] != n_video:
            return None
        spec = self.specs[processor.layer]
        reason = None if spec is None else _unsupported_reason(processor, attn, hidden_states)
        if reason is None:
            if spec is not None and spec[-1] == "fp8":
                refused = _refusal(hidden_states.device.type, _torch.DTYPES[hidden_states.dtype],
                                   attn.inner_dim // attn.heads, "fp8")
                if refused:  # never silently the native attention where FP8 was asked for
                    raise RuntimeError(f"tilewise.diffusers: layer {processor.layer} runs in FP8, which this device "
                                       f"does not: {refused}; enable(..., precision='native') runs it in "
                                       f"{hidden_states.dtype}")
            return spec
        if spec[0] == "tap":
            raise RuntimeError(f"tilewise.diffusers: cannot tap layer {processor.layer} at step {self.step}: "
                               f"{reason}")
        return None

    def tap_attention(self, layer: int, q, k, v, text_len, text_position: str):
        """A tapped call: hook(layer, step, q, k, v, geometry), whose result (or tilewise's dense attention when
        it returns None) is the attention output."""
        lengths = None if text_len is None else tuple(int(x) for x in text_len.tolist())  # one small copy
        geometry = Geometry(latent=self.latent, tile=self.tile, text_len=lengths,
                            text_position=text_position)
        out = self.tap(layer, self.step, q, k, v, geometry)
        if out is None:
            out = tilewise.dense_attention(q, k, v, text_len=text_len, **geometry.kwargs())
        return out

    def count(self, route: str) -> None:
        if not torch.compiler.is_compiling():
            self.calls[route] += 1


class ContextParallel:
    """diffusers' context parallelism as tilewise sees it on one processor (`_parallel_config`, set by
    `transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`): the Ulysses process group
    of diffusers' own device mesh, this rank, and how diffusers' hooks split a sequence of n tokens (equal chunks,
    or torch.tensor_split's with ulysses_anything)."""

    def __init__(self, cp):
        self.cp = cp
        self.ring = cp.ring_degree
        self.degree = cp.ulysses_degree
        self.group = cp._ulysses_mesh.get_group()
        self.rank = cp._ulysses_local_rank

    def sizes(self, n: int) -> list:
        P = self.degree
        if self.cp.ulysses_anything:
            return [n // P + (1 if r < n % P else 0) for r in range(P)]
        return [n // P] * P

    def local(self, n: int) -> int:
        return self.sizes(n)[self.rank]

    def total(self, n_local: int, device) -> int:
        """The global length of a part this rank holds n_local tokens of (a collective with ulysses_anything,
        where the chunks differ; arithmetic otherwise)."""
        if not self.cp.ulysses_anything:
            return n_local * self.degree
        import torch.distributed as dist
        t = torch.tensor([n_local], dtype=torch.int64, device=device)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def video_tokens(self, ctrl, n_local: int) -> int:
        """The global video length when this rank's n_local video tokens are diffusers' chunk of the recorded
        latent grid (T*H*W), else n_local (which then does not match the grid: the call stays on the model)."""
        latent = ctrl.latent
        if latent is None:
            return n_local
        n = latent[0] * latent[1] * latent[2]
        return n if self.local(n) == n_local else n_local


def context_parallel(processor) -> Optional[ContextParallel]:
    """The context parallelism diffusers set on this processor, or None."""
    config = getattr(processor, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    return None if cp is None else ContextParallel(cp)


@torch.compiler.assume_constant_result
def _refusal(device_type: str, dtype: str, head_dim: int, precision: str = "native") -> str:
    """Why the library's backend for the device refuses this dtype / head dim / precision ("" when it takes
    them): asked of the library once, a constant for torch.compile."""
    refused = _capi.device_support(device_type, dtype, head_dim, precision)
    return "" if refused is None else str(refused)


def _unsupported_reason(processor, attn, hidden_states) -> Optional[str]:
    """None when tilewise runs this call on its device, else why not: context parallelism, or a device / dtype
    / head dim the library's backend does not take (e.g. float32 on CUDA, or a GPU other than Hopper). Under
    torch.autocast the dtype is autocast's: a float32 residual stream then still runs on tilewise in bf16."""
    cp = context_parallel(processor)
    if cp is not None and cp.ring > 1:
        return f"ring attention (ring_degree = {cp.ring}) is enabled on it; tilewise runs Ulysses (ulysses_degree) only"
    device = hidden_states.device
    dtype = _torch.autocast_dtype(device) or hidden_states.dtype  # what the op itself computes in
    if device.type not in ("cpu", "cuda") or dtype not in _torch.DTYPES:
        return f"it runs on {device} in {dtype}; tilewise runs CPU and CUDA tensors in " \
            f"{', '.join(map(str, _torch.DTYPES))}"
    refused = _refusal(device.type, _torch.DTYPES[dtype], attn.inner_dim // attn.heads)
    return refused or None


@torch.compiler.disable
def _step_and_specs(ctrl: Controller, timestep, latent):
    """Eager even under torch.compile (it reads the timestep on the host): the step and the layers' patterns,
    so that compiled code depends on the patterns (guards on their values), not on the step number."""
    step = ctrl.step_index(timestep)
    return step, ctrl.specs_for(step, latent)


class Processor:
    """Base of the families' attention processors: the controller, the layer index and the original processor."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, ctrl: Controller, layer: int, original):
        self.ctrl, self.layer, self.original = ctrl, layer, original

    def call_original(self, *args, **kwargs):
        """The model's own processor for this call. Under context parallelism it gets diffusers' parallel config
        too (it was installed after enable_parallelism set it, or set on tilewise's processor instead), so that
        it runs diffusers' own sharded attention; one that cannot is an error, never a silently local result."""
        cp = context_parallel(self)
        if cp is not None:
            if not hasattr(self.original, "_parallel_config"):
                raise RuntimeError(f"tilewise.diffusers: layer {self.layer} falls back to the model's processor "
                                   f"{type(self.original).__name__}, which has no context parallelism: run this "
                                   "call on tilewise (a pattern for every layer, no attention mask) or disable "
                                   "context parallelism")
            self.original._parallel_config = self._parallel_config
        return self.original(*args, **kwargs)

    def attend(self, q, k, v, spec, text_len, text_position, local_order):
        """attend_start(...)(): the attention output at once."""
        return self.attend_start(q, k, v, spec, text_len, text_position, local_order)()

    def attend_start(self, q, k, v, spec, text_len, text_position, local_order):
        """The attention of one call on q, k, v [B, S, H, D], as finish() -> output: under context parallelism
        the input all-to-alls are issued and finish() does the rest (what runs in between overlaps them);
        otherwise finish() returns the output computed here. Under context parallelism q, k, v hold this rank's
        tokens: for each (part, global length) of `local_order` ("video" / "text"), diffusers' chunk of that part,
        concatenated in that order; tilewise.parallel's Ulysses all-to-alls then run on diffusers' process group.
        Otherwise the whole sequence, in the spec's order. q, k, v may also be tuples of those parts, not yet
        concatenated: under context parallelism the all-to-all's packing copy then reads them where they are."""
        cp = context_parallel(self)
        if isinstance(q, tuple):
            if cp is None or len(q) != len(local_order):
                q, k, v = (torch.cat(t, dim=1) if len(t) > 1 else t[0] for t in (q, k, v))
            else:
                from tilewise import parallel
                q, k, v = (parallel._SequenceParts(t) for t in (q, k, v))
        if cp is None:
            out = self._attention(q, k, v, spec, text_len, text_position)
            return lambda: out
        if spec[0] == "tap":
            raise RuntimeError(f"tilewise.diffusers: cannot tap layer {self.layer} under context parallelism: "
                               "capture on one process")
        return self._ulysses_start(cp, q, k, v, spec, text_len, text_position, local_order)

    def _attention(self, q, k, v, spec, text_len, text_position):
        tile = self.ctrl.tile
        if spec[0] == "tap":  # the hook point: q, k, v after norms and RoPE, where the attention runs
            return self.ctrl.tap_attention(self.layer, q, k, v, text_len, text_position)
        if spec[0] == "sta":
            return tilewise.sliding_tile_attention(q, k, v, latent=self.ctrl.latent, tile=tile, window=spec[1],
                                                   text_len=text_len, text_position=text_position, precision=spec[2])
        g, r = spec[1]  # frame pattern: one frame per tile, so that every block is dense or empty
        return tilewise.attention_tile(q, k, v, latent=self.ctrl.latent, tile=(1, tile[1], tile[2]), global_frames=g,
                                       radius=r, text_len=text_len, text_position=text_position, precision=spec[2])


    def _ulysses_start(self, cp: ContextParallel, q, k, v, spec, text_len, text_position, local_order):
        from tilewise import parallel
        tile, latent = self.ctrl.tile, self.ctrl.latent
        kw = dict(group=cp.group, text_len=text_len, text_position=text_position, order="raster", layout="bshd",
                  scale=None, deterministic=None, seq_len=None, **self.ctrl.parallel,
                  split=_sequence_split(cp, tuple(local_order), text_position), block_offsets=None, block_tiles=None,
                  precision=spec[2])
        if spec[0] == "sta":
            return parallel._ulysses_start(q, k, v, latent=latent, tile=tile, pattern="sliding_tile", window=spec[1],
                                           global_frames=1, radius=0, **kw)
        g, r = spec[1]
        return parallel._ulysses_start(q, k, v, latent=latent, tile=(1, tile[1], tile[2]), pattern="attention_tile",
                                       window=(1, 1, 1), global_frames=g, radius=r, **kw)


_splits: dict = {}


def _sequence_split(cp: ContextParallel, local_order: tuple, text_position: str):
    """tilewise.parallel's _SequenceSplit of diffusers' chunks: each rank holds diffusers' chunk of each part, in
    `local_order` (("video" / "text", global length) pairs); the video is the main part and the text, which the
    spec puts last or first (text_position), the extra one. Ulysses then receives the spec's order directly."""
    from tilewise import parallel
    key = (cp.degree, cp.cp.ulysses_anything, local_order, text_position)
    if key not in _splits:
        lengths = dict(local_order)
        text = cp.sizes(lengths.get("text", 0))
        _splits[key] = parallel._SequenceSplit(main=tuple(cp.sizes(lengths["video"])),
                                               extra=tuple(text) if sum(text) else (),
                                               extra_first=text_position == "first",
                                               extra_first_locally=local_order[0][0] == "text")
    return _splits[key]


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


def enable(model, strategy, *, tile=None, timesteps=None, load_balance=None, chunks=1, sm_margin=0,
           early_start=True, precision=None, exchange="nccl"):
    """Routes the self-attention of a diffusers video transformer (or of a pipeline's transformer(s)) through
    tilewise. Returns the Controller (for a pipeline with two transformers, the first one's).

    strategy: a window (kt, kh, kw), one window per head, {"window": ..., "tile": ...}, a table (dict or JSON
    path) keyed "<step>_<layer>_<head>" -> [kt, kh, kw], or a calibrated strategy (tilewise.calibrate.Strategy,
    or its JSON file / dict with "format": "tilewise-strategy").
    tile: (tt, th, tw), default (6, 8, 8) or the calibrated strategy's.
    timesteps: the denoising timesteps of the run, for per-step tables (not needed when `model` is a
    pipeline: its scheduler's set_timesteps is hooked).
    load_balance, chunks, sm_margin: under diffusers' context parallelism, tilewise.parallel.ulysses_attention's
    options (heads assigned to ranks by their FLOPs, None = when the pattern differs between heads; head groups
    whose all-to-alls overlap the other groups' attention; SMs the attention kernels leave to the collectives,
    FlashAttention-3's sm_margin, which does not change the result).
    early_start: under context parallelism, a block whose attention does not feed the work before it (HunyuanVideo's
    single-stream blocks, where diffusers runs the MLP first) issues its attention's all-to-all before that work,
    so that the exchange overlaps it; False: at the attention call. Same result either way.
    exchange: under context parallelism, how the heads are exchanged: "nccl" or "copy_engine" (copy-engine
    transfers into the peers' symmetric memory, no SMs taken; inference, with autograd NCCL's;
    tilewise.parallel.ulysses_attention). Same result either way.
    precision: "fp8" runs every tilewise call in FP8 (docs/semantics.md §11; forward only; the CPU and Hopper
    backends), "native" every call in the model's dtype, None (default) what the
    strategy says (a calibrated strategy's FP8 heads: a (step, layer) runs FP8 when all its heads chose it)."""
    if load_balance is not None and not isinstance(load_balance, bool):
        raise ValueError(f"invalid load_balance = {load_balance!r}: expected True, False or None")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"invalid chunks = {chunks!r}: expected an integer of at least 1")
    if not isinstance(early_start, bool):
        raise ValueError(f"invalid early_start = {early_start!r}: expected True or False")
    from tilewise import parallel
    parallel._sm_margin(sm_margin)  # refused here, not at the first parallel call
    tilewise._args.choice("exchange", exchange, parallel.EXCHANGES)
    if precision is not None and precision not in tilewise._args.PRECISIONS:
        raise ValueError(f"invalid precision = {precision!r}: expected None (the strategy's), 'native' or 'fp8'")
    return _enable(model, Strategy.coerce(strategy, tile), timesteps,
                   dict(load_balance=load_balance, chunks=chunks, sm_margin=sm_margin, exchange=exchange), precision,
                   early_start)


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
    ctrl = _enable(model, _Tap(steps, layers, tile), timesteps, None)
    for t in _transformers(model)[0]:
        controller(t).tap = hook
    return ctrl


def _enable(model, parsed, timesteps, parallel, precision=None, early_start=True) -> Controller:
    transformers, pipe = _transformers(model)
    ctrls = []
    for t in transformers:
        family = family_of(t)
        if controller(t) is not None:
            disable(t)
        ctrl = Controller(t, family, parsed, timesteps, parallel, precision)
        ctrl.early_start = early_start
        cls = family.processor
        processors = []
        for layer, (module, original) in enumerate(zip(ctrl.modules, ctrl.originals)):
            processor = cls(ctrl, layer, original)
            config = getattr(t, "_parallel_config", None)  # enable_parallelism ran first: it records its config
            if getattr(config, "context_parallel_config", None) is not None:
                processor._parallel_config = config
            module.set_processor(processor)
            processors.append(processor)
        ctrl._hook = t.register_forward_pre_hook(ctrl._pre_hook, with_kwargs=True)
        ctrl._family_hooks = family.install_hooks(t, processors)
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
            config = getattr(module.processor, "_parallel_config", None)
            if config is not None and hasattr(original, "_parallel_config"):  # enable_parallelism ran meanwhile
                original._parallel_config = config
            module.set_processor(original)
        ctrl._hook.remove()
        for hook in getattr(ctrl, "_family_hooks", ()):
            hook.remove()
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
