"""Live capture: calibration errors (and optionally q, k, v files) from a running diffusers generation.

    import tilewise.calibrate as cal

    with cal.capture(pipe, steps=range(10, 50, 5), candidates=[(3, 3, 3), (1, 6, 10)], skip_steps=10) as cap:
        pipe(prompt, num_inference_steps=50)
    strategy = cap.result().select(budget=1e-3, metric="rel_mse")

It sits on tilewise.diffusers.tap(): at each self-attention call of a selected (step, layer) the hook gets the
call's q, k, v (after QK norms and RoPE) and its geometry; the step is the index of the denoising timestep, as
for per-step strategies. With candidates, the hook runs tilewise.calibrate.evaluate() on the device (dense once,
every candidate once, per-head error sums; one small device-to-host copy per call), keeps the [C, H] errors and
returns the dense output as the call's output, so nothing large is kept or written. With out_dir, it writes the
call's q, k, v with save_capture() (for the CLI). Other calls run the model's own processors, so the generation
is the dense one.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from tilewise.calibrate.capture import Geometry, save_capture, shape_bshd
from tilewise.calibrate.search import SearchResult, _evaluate, _mean_evaluation, canonical_window, expand, \
    parse_windows
from tilewise.calibrate.strategy import format_window

_ANY_GRID = (1 << 30,) * 3


class LiveCapture:
    """The state of one capture (see capture()). Use it as a context manager, or call remove() when done.

    evaluations: {(step, layer): [Evaluation, ...]} (one per call: samples, CFG branches);
    files: manifests written to out_dir; calls: tapped calls seen."""

    def __init__(self, model, *, steps=None, layers=None, candidates=None, out_dir=None, skip_steps: int = 0,
                 tile=None, timesteps=None, sample: int = 0, precisions: Sequence[str] = ("native",)):
        import tilewise.diffusers as twd

        if isinstance(candidates, str):
            candidates = parse_windows(candidates)
        if candidates is not None:
            candidates = [canonical_window(c, _ANY_GRID) for c in candidates]  # checks the form only
            if not candidates:
                raise ValueError("invalid candidates: none given")
        if candidates is None and out_dir is None:
            raise ValueError("capture: give candidates= (errors measured live) and/or out_dir= (q, k, v files)")
        self.skip_steps = int(skip_steps)
        if self.skip_steps < 0:
            raise ValueError(f"invalid skip_steps = {skip_steps}: expected an integer >= 0")
        self.steps = None if steps is None else sorted({int(s) for s in steps})
        self.layers = None if layers is None else sorted({int(l) for l in layers})
        for name, values in (("steps", self.steps), ("layers", self.layers)):
            if values is not None and values and values[0] < 0:
                raise ValueError(f"invalid {name} = {values}: expected indices >= 0")
        self.candidates = candidates
        self.precisions = list(precisions)
        expand([], self.precisions)  # checks them now, not at the first call
        self.out_dir = out_dir
        self.sample = int(sample)
        self.evaluations = defaultdict(list)
        self.files = []
        self.calls = 0
        self.geometry: Optional[Geometry] = None
        self.shape = None        # (B, S, Hq, Hkv, D) of the first call
        self.windows = None      # candidates clamped to the grid, repeats dropped (at the first call)
        self._samples = defaultdict(int)
        tapped = range(self.skip_steps, 1 << 62) if self.steps is None else \
            [s for s in self.steps if s >= self.skip_steps]
        self._model = model
        self._twd = twd
        self.controller = twd.tap(model, self._hook, steps=tapped, layers=self.layers, tile=tile,
                                  timesteps=timesteps)
        self._removed = False

    # --- the hook ---
    def _hook(self, layer, step, q, k, v, geometry: Geometry):
        self._check_geometry(q, k, geometry)
        self.calls += 1
        if self.out_dir is not None:
            self.files.append(save_capture(self.out_dir, step=step, layer=layer, q=q, k=k, v=v, geometry=geometry,
                                           sample=self.sample + self._samples[(step, layer)]))
            self._samples[(step, layer)] += 1
        if self.candidates is None:
            return None
        windows, precisions = expand(self.windows, self.precisions)
        evaluation, dense = _evaluate(q, k, v, geometry, "sliding_tile", windows, None, return_dense=True,
                                      precisions=precisions)
        self.evaluations[(step, layer)].append(evaluation)
        if isinstance(dense, np.ndarray):  # numpy and CPU tensors run on the CPU backend
            import torch

            dense = torch.from_numpy(dense).to(q.dtype)
        return dense

    def _check_geometry(self, q, k, geometry: Geometry) -> None:
        B, S, Hq, D = shape_bshd(q, geometry.layout)
        Hkv = shape_bshd(k, geometry.layout)[2]
        if self.geometry is None:
            self.geometry, self.shape = geometry, (B, S, Hq, Hkv, D)
            if self.candidates is not None:
                self.windows = list(dict.fromkeys(canonical_window(c, geometry.grid) for c in self.candidates))
            return
        g = self.geometry
        if (geometry.latent, geometry.tile, Hq) != (g.latent, g.tile, self.shape[2]):
            raise ValueError(f"capture: a call has latent {format_window(geometry.latent)}, tile "
                             f"{format_window(geometry.tile)} and {Hq} heads, but the first one had "
                             f"{format_window(g.latent)}, {format_window(g.tile)} and {self.shape[2]}: one capture "
                             "covers one geometry (capture each resolution separately)")

    # --- results ---
    def result(self) -> SearchResult:
        """The errors of every candidate at every captured (step, layer), averaged over its calls, as a
        SearchResult (select(), save(), the report). Steps < skip_steps that were asked for (every one of them
        with steps=None) are its skipped keys: the strategy gets explicit dense windows for them."""
        if self.candidates is None:
            raise ValueError(f"capture: no candidates were given, so no errors were measured; search the q, k, v "
                             f"files: tilewise calibrate --captures {self.out_dir} --candidates ...")
        if self.geometry is None:
            raise ValueError("capture: no attention call was captured: was the model run, with the selected steps "
                             "and layers (and the timesteps known)?")
        keys = sorted(self.evaluations)
        evals = [_mean_evaluation(self.evaluations[k]) for k in keys]
        layers = self.layers if self.layers is not None else range(len(self.controller.modules))
        if self.steps is None:  # every step: the skip steps of the run
            run = len(self.controller.timesteps or ())
            skip_steps = range(min(self.skip_steps, run))
        else:
            skip_steps = [s for s in self.steps if s < self.skip_steps]
        skipped = [(s, l) for s in skip_steps for l in layers]
        windows, precisions = expand(self.windows, self.precisions)
        C, H = len(windows), self.shape[2]
        return SearchResult(windows, keys,
                            np.array([e.mse for e in evals]).reshape(len(evals), C, H),
                            np.array([e.l1 for e in evals]).reshape(len(evals), C, H),
                            np.array([e.energy for e in evals]).reshape(len(evals), H),
                            evals[0].density if evals else np.zeros(C),
                            np.array([e.flops for e in evals]).reshape(len(evals), C),
                            np.array([e.dense_flops for e in evals]),
                            skipped, self.skip_steps, self.geometry, self.shape, "live capture",
                            precisions=None if self.precisions == ["native"] else precisions)

    # --- lifetime ---
    def remove(self) -> None:
        """Puts the model's own processors back (idempotent)."""
        if not self._removed:
            self._twd.disable(self._model)
            self._removed = True

    def __enter__(self) -> "LiveCapture":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


def capture(model, *, steps: Optional[Sequence[int]] = None, layers: Optional[Sequence[int]] = None,
            candidates=None, out_dir=None, skip_steps: int = 0, tile=None, timesteps=None,
            sample: int = 0, precisions: Sequence[str] = ("native",)) -> LiveCapture:
    """Captures the self-attention of a diffusers video transformer (HunyuanVideo, Wan, CogVideoX) or of a
    pipeline holding one, during a real generation, for calibration.

    steps, layers: denoising step indices and layer indices (tilewise.diffusers' numbering), None = all.
    candidates: windows (kt, kh, kw) (or "3x3x3,1x6x10") whose per-head errors against dense attention are
    measured at each captured call (tilewise.calibrate.evaluate, on the call's device; nothing large is kept).
    out_dir: also (or instead) write each call's q, k, v with save_capture (samples numbered from `sample`).
    skip_steps: steps below it are not measured (they stay dense in the strategy).
    tile: the tile of the windows (default (6, 8, 8)); timesteps: the run's denoising timesteps when `model` is
    a transformer (a pipeline's scheduler is hooked, as in tilewise.diffusers.enable).
    precisions: ("native", "fp8") also measures every candidate in FP8 (docs/semantics.md §11; CPU so far).

    The captured calls return tilewise's dense attention (the same math as the model's attention) and the
    others run the model's own processors, so the generation is the dense one. Returns a LiveCapture: a context
    manager (or call .remove()) whose .result() is a SearchResult."""
    return LiveCapture(model, steps=steps, layers=layers, candidates=candidates, out_dir=out_dir,
                       skip_steps=skip_steps, tile=tile, timesteps=timesteps, sample=sample, precisions=precisions)
