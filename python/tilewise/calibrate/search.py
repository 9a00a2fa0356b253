"""The search: per-head errors of candidate patterns against dense attention, and the choice of a window per
(step, layer, head) (STA) or of the global frames per layer (Efficient-vDiT's attention tile).

Definitions (docs/calibration.md):

- For one attention call with output O (dense) and O_c (candidate c, the same window for every head), the
  errors of query head h are
      mse[c, h] = mean over (b, s, d) of (O_c[b, s, h, d] - O[b, s, h, d])^2
      l1[c, h]  = mean over (b, s, d) of |O_c[b, s, h, d] - O[b, s, h, d]|
  over all B*S*D elements (text rows included; they never differ), and
      energy[h] = mean over (b, s, d) of O[b, s, h, d]^2,   rel_mse[c, h] = mse[c, h] / energy[h].
  Several samples of one (step, layer) average mse, l1 and energy (rel_mse is the ratio of the averages).
- Cost of a candidate: its video density (allowed video-video pairs / N_video^2, tilewise.Plan.density()) and its
  FLOPs (tilewise.Plan.flops(text_len), text included). Windows are clamped to the grid first (k >= n is the
  whole axis), so a candidate equal to the grid is dense: it is not run and its error is 0.
- Precision: with precisions=("native", "fp8") every window is a candidate twice, in bf16 / the inputs' dtype and
  in FP8 (docs/semantics.md §11), whose error then includes the quantisation's; an FP8 candidate costs its density
  times FP8_COST in the budget selection, so the cheapest candidate within the budget may be an FP8 one.

`evaluate()` works on one call's q, k, v (numpy arrays, or torch tensors: CUDA tensors stay on the device), so a
live capture hook can feed it directly; `search()` runs it over captures loaded from disk.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections import defaultdict
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

import tilewise
from tilewise._args import PRECISIONS  # the precisions a call takes: each is a candidate dimension here
from tilewise.calibrate import _backend
from tilewise.calibrate.capture import Capture, Geometry, shape_bshd
from tilewise.calibrate.strategy import Strategy, format_window

METRICS = ("mse", "l1", "rel_mse")
# An FP8 candidate's cost relative to the same window in bf16, as measured: the Hopper FP8 path v2 takes 24.56 ms
# where bf16 takes 22.27 ms (HunyuanVideo 720p, window 3x3x3, H200; docs/bench/h200-fp8-v2.md), so FP8 buys no
# speed yet and costs the same (ratios above 1 are not modelled): an FP8 candidate wins only where it has the lower
# error. A select() argument (--fp8-cost): 0.6 models issue 18's goal (14 ms).
FP8_COST = 1.0


def expand(windows: Sequence, precisions: Sequence[str]) -> tuple:
    """The candidates of windows x precisions, precision-major: (windows, precisions), two parallel lists."""
    precisions = list(precisions)
    if not precisions or len(set(precisions)) != len(precisions) or not set(precisions) <= set(PRECISIONS):
        raise ValueError(f"invalid precisions = {precisions!r}: expected distinct values of {', '.join(PRECISIONS)}")
    return [w for _ in precisions for w in windows], [p for p in precisions for _ in windows]


def label(window, precision: str = "native") -> str:
    """'3x3x3', or '3x3x3 fp8' for an FP8 candidate."""
    return format_window(window) + ("" if precision == "native" else f" {precision}")


def canonical_window(window, grid) -> tuple:
    """The window clamped to the grid: k >= n selects the whole axis, so min(k, n) selects the same keys."""
    w = tuple(int(x) for x in window)
    if len(w) != 3 or min(w) < 1:
        raise ValueError(f"invalid window = {window!r}: expected three integers >= 1 (kt, kh, kw)")
    return tuple(min(k, n) for k, n in zip(w, grid))


def parse_windows(text: str) -> list:
    """'3x3x3,1x5x5' -> [(3, 3, 3), (1, 5, 5)]."""
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            w = tuple(int(p) for p in parts)
        except ValueError:
            w = ()
        if len(w) != 3 or min(w) < 1:
            raise ValueError(f"invalid window {item.strip()!r}: expected KTxKHxKW, three integers >= 1 (e.g. 3x3x3)")
        out.append(w)
    return out


_COST_MODELS: dict = {}


class CostModel:
    """Density and FLOPs of patterns on one problem shape, from tilewise plans on zero-stride placeholder arrays
    (nothing is allocated or run). Per-head costs add up: the FLOPs of per-head windows are the mean of the
    FLOPs of each head's window applied to every head."""

    def __init__(self, geometry: Geometry, batch: int, seq: int, q_heads: int, kv_heads: int, head_dim: int):
        self.geometry, self.batch, self.seq = geometry, batch, seq
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self._cache = {}

    @staticmethod
    def of(q, k, geometry: Geometry) -> "CostModel":
        """The cost model of q, k's shapes; the last few are kept, so that repeated calls (a live hook) do not
        plan again."""
        B, S, Hq, D = shape_bshd(q, geometry.layout)
        key = (geometry, B, S, Hq, shape_bshd(k, geometry.layout)[2], D)
        model = _COST_MODELS.pop(key, None) or CostModel(*key)
        _COST_MODELS[key] = model
        while len(_COST_MODELS) > 16:
            _COST_MODELS.pop(next(iter(_COST_MODELS)))
        return model

    def key(self) -> tuple:
        return (self.geometry, self.batch, self.seq, self.q_heads, self.kv_heads, self.head_dim)

    def _costs(self, pattern: str, **params) -> tuple:
        key = (pattern, tuple(sorted(params.items())))
        if key not in self._cache:
            g = self.geometry
            zeros = np.zeros(self.head_dim, np.float32)
            q = np.broadcast_to(zeros, (self.batch, self.seq, self.q_heads, self.head_dim))
            kv = np.broadcast_to(zeros, (self.batch, self.seq, self.kv_heads, self.head_dim))
            plan = tilewise.Plan(q, kv, kv, latent=g.latent, tile=g.tile, pattern=pattern,
                                 text_position=g.text_position, **params)
            self._cache[key] = (plan.density(), plan.flops(g.text_len_list(self.batch)))
        return self._cache[key]

    def density(self, window) -> float:
        return self._costs("sliding_tile", window=tuple(window))[0]

    def flops(self, window) -> float:
        """FLOPs of the call with `window` for every head."""
        return self._costs("sliding_tile", window=tuple(window))[1]

    def frame_density(self, global_frames: int, radius: int = 0) -> float:
        return self._costs("attention_tile", global_frames=int(global_frames), radius=int(radius))[0]

    def frame_flops(self, global_frames: int, radius: int = 0) -> float:
        return self._costs("attention_tile", global_frames=int(global_frames), radius=int(radius))[1]

    @property
    def dense_flops(self) -> float:
        return self._costs("dense")[1]

    def head_flops(self, windows: Sequence) -> float:
        """FLOPs of one call with per-head windows (one per query head)."""
        return sum(self.flops(w) for w in windows) / len(windows)


@dataclass
class Evaluation:
    """Per-head errors of candidates against dense attention for one attention call (or the mean of several).

    candidates: the canonical patterns, windows (kt, kh, kw) or frame patterns (global_frames, radius);
    mse, l1: [C, H]; energy: [H]; density, flops: [C]; dense_flops: the dense call's FLOPs."""

    kind: str  # "sliding_tile" or "attention_tile"
    candidates: list
    mse: np.ndarray
    l1: np.ndarray
    energy: np.ndarray
    density: np.ndarray
    flops: np.ndarray
    dense_flops: float
    precisions: Optional[list] = None  # per candidate, None = all "native"

    @property
    def rel_mse(self) -> np.ndarray:
        return _relative(self.mse, self.energy)

    def error(self, metric: str = "mse") -> np.ndarray:
        return metric_of(metric, self.mse, self.l1, self.energy)


def _relative(mse, energy):
    with np.errstate(divide="ignore", invalid="ignore"):
        r = mse / energy[..., None, :]
    return np.where(mse == 0, 0.0, r)


def metric_of(metric: str, mse, l1, energy):
    if metric == "mse":
        return mse
    if metric == "l1":
        return l1
    if metric == "rel_mse":
        return _relative(mse, energy)
    raise ValueError(f"invalid metric = {metric!r}: expected one of {', '.join(METRICS)}")


def _evaluate(q, k, v, geometry: Geometry, kind: str, candidates: list, cost: Optional[CostModel],
              tick: Optional[Callable] = None, return_dense: bool = False, precisions: Optional[list] = None):
    """The Evaluation, and with return_dense also the dense output (a numpy array for numpy and CPU torch
    inputs, a tensor for CUDA ones), so that a live capture can return it as the call's output. precisions: one
    per candidate (None = all native)."""
    (q, k, v), ops = _backend.prepare(q, k, v)
    B, S, H, D = shape_bshd(q, geometry.layout)
    if cost is None or cost.key() != (geometry, B, S, H, shape_bshd(k, geometry.layout)[2], D):
        cost = CostModel.of(q, k, geometry)
    kw = geometry.kwargs()
    text_len = geometry.text_len_list(B)
    count = float(B * S * D)

    dense = tilewise.dense_attention(q, k, v, text_len=text_len, **kw)
    if tick:
        tick()
    energy = ops.square_sums(dense, geometry.layout)
    sq, ab, density, flops = [], [], [], []
    for i, c in enumerate(candidates):
        precision = precisions[i] if precisions else "native"
        if kind == "sliding_tile":
            d, f = cost.density(c), cost.flops(c)
        else:
            d, f = cost.frame_density(*c), cost.frame_flops(*c)
        density.append(d)
        flops.append(f)
        if d >= 1.0 and precision == "native":  # the dense pattern itself: nothing to run
            zeros = ops.square_sums(dense[:0], geometry.layout)  # batch axis 0 in both layouts
            sq.append(zeros)
            ab.append(zeros)
        else:
            if d >= 1.0:
                o = tilewise.dense_attention(q, k, v, text_len=text_len, precision=precision, **kw)
            elif kind == "sliding_tile":
                o = tilewise.sliding_tile_attention(q, k, v, window=c, text_len=text_len, precision=precision, **kw)
            else:
                o = tilewise.attention_tile(q, k, v, global_frames=c[0], radius=c[1], text_len=text_len,
                                            precision=precision, **kw)
            s, a = ops.diff_sums(o, dense, geometry.layout)
            sq.append(s)
            ab.append(a)
            del o
            if tick:
                tick()
    values = ops.to_numpy([energy, *sq, *ab])
    C = len(candidates)
    e = Evaluation(kind, list(candidates), values[1:1 + C] / count, values[1 + C:] / count, values[0] / count,
                   np.array(density), np.array(flops), cost.dense_flops, list(precisions) if precisions else None)
    return (e, dense) if return_dense else e


def evaluate(q, k, v, geometry: Geometry, candidates: Sequence, *, precisions: Sequence[str] = ("native",),
             cost: Optional[CostModel] = None, tick: Optional[Callable] = None) -> Evaluation:
    """Per-head errors of STA windows against dense attention on one call's q, k, v ([B, S, H, D] in
    geometry.layout). Dense runs once and every candidate once, with the same window for all heads; the errors
    are reduced per head chunk by chunk, so nothing larger than an output is held besides the dense output.
    Candidates are clamped to the grid and must be distinct after that. precisions: each window is evaluated in
    each ("fp8": docs/semantics.md §11, the CPU backend so far), precision-major."""
    windows = [canonical_window(c, geometry.grid) for c in candidates]
    if len(set(windows)) != len(windows):
        raise ValueError(f"invalid candidates = {[format_window(c) for c in candidates]}: clamped to the grid "
                         f"{format_window(geometry.grid)} they are {[format_window(w) for w in windows]}, with "
                         "repeats")
    windows, precs = expand(windows, precisions)
    return _evaluate(q, k, v, geometry, "sliding_tile", windows, cost, tick, precisions=precs)


def evaluate_frames(q, k, v, geometry: Geometry, global_frames: Sequence[int], radius: int = 0, *,
                    cost: Optional[CostModel] = None, tick: Optional[Callable] = None) -> Evaluation:
    """Like evaluate() for Efficient-vDiT's attention tile: one candidate per number of global frames g (with
    the same local radius), every head alike."""
    return _evaluate(q, k, v, geometry, "attention_tile", [(int(g), int(radius)) for g in global_frames], cost,
                     tick)


# ----------------------------------------------------------------------------------------------------------------
# Searches over captures

def _group(captures: Sequence[Capture]) -> dict:
    groups = defaultdict(list)
    first = captures[0]
    for c in captures:
        g, f = c.geometry, first.geometry
        if (g.latent, g.tile, c.heads) != (f.latent, f.tile, first.heads):
            raise ValueError(f"invalid captures: step {c.step} layer {c.layer} sample {c.sample} has latent "
                             f"{format_window(g.latent)}, tile {format_window(g.tile)} and {c.heads} heads, but step "
                             f"{first.step} layer {first.layer} has {format_window(f.latent)}, "
                             f"{format_window(f.tile)} and {first.heads}: one search covers one geometry")
        groups[(c.step, c.layer)].append(c)
    return dict(sorted(groups.items()))


class _Ticker:
    def __init__(self, total: int, progress: Optional[Callable]):
        self.done, self.total, self.progress, self.label = 0, total, progress, ""

    def __call__(self):
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total, self.label)


def _mean_evaluation(evals: list) -> Evaluation:
    e = evals[0]
    if len(evals) == 1:
        return e
    return Evaluation(e.kind, e.candidates, np.mean([x.mse for x in evals], axis=0),
                      np.mean([x.l1 for x in evals], axis=0), np.mean([x.energy for x in evals], axis=0),
                      e.density, np.mean([x.flops for x in evals], axis=0),
                      float(np.mean([x.dense_flops for x in evals])), e.precisions)


@dataclass
class SearchResult:
    """Errors of every candidate window for every evaluated (step, layer), averaged over samples.

    keys: [(step, layer)] evaluated; mse, l1: [N, C, H]; energy: [N, H]; flops: [N, C]; dense_flops: [N];
    density: [C]; skipped: [(step, layer)] captured but kept dense (step < skip_steps), not evaluated."""

    candidates: list
    keys: list
    mse: np.ndarray
    l1: np.ndarray
    energy: np.ndarray
    density: np.ndarray
    flops: np.ndarray
    dense_flops: np.ndarray
    skipped: list
    skip_steps: int
    geometry: Geometry
    shape: tuple  # (B, S, Hq, Hkv, D) of the first capture
    captures: str = ""
    metric: Optional[str] = None  # the metric the search's selection used (saved, so a re-selection reuses it)
    precisions: Optional[list] = None  # per candidate, None = all "native"

    @property
    def grid(self) -> tuple:
        return self.geometry.grid

    @property
    def candidate_precisions(self) -> list:
        return list(self.precisions) if self.precisions else ["native"] * len(self.candidates)

    def label(self, c: int) -> str:
        """Candidate c as the reports name it: '3x3x3' or '3x3x3 fp8'."""
        return label(self.candidates[c], self.candidate_precisions[c])

    def cost(self, fp8_cost: float = FP8_COST) -> np.ndarray:
        """[C]: what the budget selection minimises, the density, times fp8_cost for FP8 candidates."""
        factor = np.array([fp8_cost if p == "fp8" else 1.0 for p in self.candidate_precisions])
        return np.asarray(self.density, float) * factor

    @property
    def heads(self) -> int:
        return self.shape[2]

    def error(self, metric: str = "mse") -> np.ndarray:
        return metric_of(metric, self.mse, self.l1, self.energy)

    def cost_model(self) -> CostModel:
        B, S, Hq, Hkv, D = self.shape
        return CostModel(self.geometry, B, S, Hq, Hkv, D)

    def choose(self, *, budget: Optional[float] = None, argmin: bool = False, metric: Optional[str] = None,
               fp8_cost: float = FP8_COST) -> np.ndarray:
        """Index of the chosen candidate per (key, head), [N, H]; -1 = dense.

        budget: the lowest-cost candidate (its density; times fp8_cost in FP8) whose error <= budget (ties: lower
        error, then candidate order); dense when none is. argmin: the candidate of lowest error (ties: lower cost)
        among those sparser than dense; dense only when every candidate is dense."""
        if (budget is None) == (not argmin):
            raise ValueError("give exactly one of budget= (cheapest candidate within the budget) and argmin=True")
        fp8_cost = float(fp8_cost)
        if not 0 < fp8_cost <= 1:
            raise ValueError(f"invalid fp8_cost = {fp8_cost}: expected a number in (0, 1], an FP8 candidate's cost "
                             "relative to the same window in bf16")
        err = self.error(metric or self.metric or "mse")  # [N, C, H]
        N, C, H = err.shape
        if C == 0:
            return np.full((N, H), -1)
        dens, cost = self.density[None, :, None], self.cost(fp8_cost)[None, :, None]
        if argmin:  # candidates equal to the grid (dense, error 0) would always win: they do not take part
            err = np.where(dens < 1.0, err, np.inf)
            best = err.min(axis=1, keepdims=True)
            pick = np.argmin(np.where(err == best, cost, np.inf), axis=1)
            return np.where(np.isfinite(best[:, 0, :]), pick, -1)
        budget = float(budget)
        if not budget >= 0:
            raise ValueError(f"invalid budget = {budget}: expected a number >= 0")
        ok = err <= budget
        cheapest = np.where(ok, cost, np.inf).min(axis=1, keepdims=True)
        pick = np.argmin(np.where(ok & (cost == cheapest), err, np.inf), axis=1)
        return np.where(np.isfinite(cheapest[:, 0, :]), pick, -1)

    def select(self, *, budget: Optional[float] = None, argmin: bool = False, metric: Optional[str] = None,
               skip_steps: Optional[int] = None, num_steps: Optional[int] = None,
               fill: str = "dense", fp8_cost: float = FP8_COST) -> Strategy:
        """The strategy: a window per (step, layer, head) of every captured (step, layer), and the heads whose
        choice is an FP8 candidate (Strategy.fp8). metric: default the search's own (`self.metric`, saved with it),
        else "mse". Steps < skip_steps (at least the search's) are dense. num_steps/fill: with fill="previous", a
        step below num_steps that was not captured takes the windows (and precisions) of the closest captured step
        before it (layer by layer); with "dense" it is left out, so that it falls back to the default (dense).
        fp8_cost: see choose()."""
        skip = self.skip_steps if skip_steps is None else int(skip_steps)
        if skip < self.skip_steps:
            raise ValueError(f"invalid skip_steps = {skip}: the search skipped (did not evaluate) steps < "
                             f"{self.skip_steps}, so it cannot choose windows for them")
        if fill not in ("dense", "previous"):
            raise ValueError(f"invalid fill = {fill!r}: expected 'dense' or 'previous'")
        metric = metric or self.metric or "mse"
        bad = self.non_finite()
        if bad:  # NaN compares false with every budget: those heads would silently fall back to dense
            raise ValueError(f"invalid search result: the errors of (step, layer) {', '.join(map(str, bad[:5]))}"
                             f"{' ...' if len(bad) > 5 else ''} are NaN or Inf (from q, k, v or outputs holding "
                             "them): expected finite errors to choose windows from")
        chosen = self.choose(budget=budget, argmin=argmin, metric=metric, fp8_cost=fp8_cost)
        dense = self.grid
        precisions = self.candidate_precisions
        windows, fp8 = {}, set()
        for (step, layer) in self.skipped:
            for h in range(self.heads):
                windows[(step, layer, h)] = dense
        for n, (step, layer) in enumerate(self.keys):
            for h in range(self.heads):
                c = chosen[n, h]
                windows[(step, layer, h)] = dense if step < skip or c < 0 else self.candidates[c]
                if step >= skip and c >= 0 and precisions[c] == "fp8":
                    fp8.add((step, layer, h))
        if fill == "previous" and num_steps:
            captured = sorted({k[0] for k in windows})
            by_step = defaultdict(dict)
            for (s, l, h), w in windows.items():
                by_step[s][(l, h)] = w
            for step in range(int(num_steps)):
                if step in by_step:
                    continue
                prev = [s for s in captured if s < step]
                source = by_step[prev[-1]] if prev and step >= skip else None
                for (l, h), w in (source or {}).items():
                    windows[(step, l, h)] = w
                    if (prev[-1], l, h) in fp8:
                        fp8.add((step, l, h))
        if not argmin and not np.isfinite(float(budget)):
            budget = "inf"  # strict JSON has no Infinity
        search = {"metric": metric, "budget": None if argmin else budget, "argmin": bool(argmin),
                  "candidates": [list(c) for c in self.candidates], "captures": self.captures,
                  "fill": fill, "num_steps": num_steps}
        if self.precisions:
            search.update(precisions=list(self.precisions), fp8_cost=float(fp8_cost))
        return Strategy(windows=windows, grid=self.grid, latent=self.geometry.latent, tile=self.geometry.tile,
                        skip_steps=skip, search=search, fp8=frozenset(fp8))

    # --- persistence: re-select (another budget, metric) without re-running attention --------------------------
    def non_finite(self) -> list:
        """[(step, layer)] whose errors hold NaN or Inf (from captures or outputs that did)."""
        bad = ~np.isfinite(self.mse).all(axis=(1, 2)) | ~np.isfinite(self.l1).all(axis=(1, 2)) \
            | ~np.isfinite(self.energy).all(axis=1) if len(self.keys) else np.zeros(0, bool)
        return [k for k, b in zip(self.keys, bad) if b]

    def save(self, path) -> None:
        """Writes the errors (npz with a JSON header), atomically: an interrupted write leaves no partial file."""
        meta = {"format": "tilewise-search", "version": 1, "candidates": [list(c) for c in self.candidates],
                "keys": [list(k) for k in self.keys], "skipped": [list(k) for k in self.skipped],
                "skip_steps": self.skip_steps, "geometry": self.geometry.to_json(), "shape": list(self.shape),
                "captures": self.captures, "metric": self.metric, "precisions": self.precisions}
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), mse=self.mse, l1=self.l1, energy=self.energy,
                     density=self.density, flops=self.flops, dense_flops=self.dense_flops)
        os.replace(tmp, path)

    @staticmethod
    def load(path) -> "SearchResult":
        """Reads what save() wrote. A missing, truncated or foreign file is a ValueError naming the file (and the
        field)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"invalid errors file {path}: {'a directory' if path.is_dir() else 'does not exist'}: "
                             "expected the search.npz of an earlier search (in its --report-dir)")
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"invalid errors file {path}: not an npz archive ({e}): expected the search.npz of "
                             "an earlier search") from None
        field = "meta"
        try:
            with z:
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("a single .npy array")
                meta = json.loads(str(z["meta"]))
                if not isinstance(meta, dict) or meta.get("format") != "tilewise-search":
                    raise ValueError("\"format\" is not \"tilewise-search\": not written by SearchResult.save")
                arrays = {}
                for field in ("mse", "l1", "energy", "density", "flops", "dense_flops"):
                    arrays[field] = np.asarray(z[field], dtype=np.float64)
                field = "meta"
                candidates = [canonical_window(c, (1 << 30,) * 3) for c in meta["candidates"]]
                keys = [(int(s), int(l)) for s, l in meta["keys"]]
                skipped = [(int(s), int(l)) for s, l in meta["skipped"]]
                N, C, H = len(keys), len(candidates), int(meta["shape"][2])
                for name, shape in (("mse", (N, C, H)), ("l1", (N, C, H)), ("energy", (N, H)), ("density", (C,)),
                                    ("flops", (N, C)), ("dense_flops", (N,))):
                    field = name
                    if arrays[name].shape != shape:
                        raise ValueError(f"shape {arrays[name].shape}, expected {shape} (keys x candidates x heads)")
                field = "meta"
                metric = meta.get("metric")
                if metric is not None and metric not in METRICS:
                    raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
                precisions = meta.get("precisions")
                if precisions is not None and (len(precisions) != C or not set(precisions) <= set(PRECISIONS)):
                    raise ValueError(f"precisions {precisions!r}: expected one of {', '.join(PRECISIONS)} per "
                                     f"candidate ({C})")
                return SearchResult(candidates, keys, arrays["mse"], arrays["l1"], arrays["energy"],
                                    arrays["density"], arrays["flops"], arrays["dense_flops"], skipped,
                                    int(meta["skip_steps"]), Geometry.from_json(meta["geometry"]),
                                    tuple(int(x) for x in meta["shape"]), str(meta.get("captures", "")), metric,
                                    precisions)
        except KeyError as e:
            raise ValueError(f"invalid errors file {path}: {e.args[0]!r} is missing (in {field}): expected the "
                             "search.npz of an earlier search") from None
        except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"invalid errors file {path}: \"{field}\": {e}") from None


def search(captures: Sequence[Capture], candidates: Sequence, *, precisions: Sequence[str] = ("native",),
           skip_steps: int = 0, progress: Optional[Callable] = None, source: str = "") -> SearchResult:
    """Evaluates every candidate window (in each of `precisions`) on every captured (step, layer) with step >=
    skip_steps.

    progress(done, total, label) is called after every attention call."""
    if not captures:
        raise ValueError("invalid captures: none given")
    if not candidates:
        raise ValueError("invalid candidates: none given")
    groups = _group(captures)
    first = captures[0]
    geometry = first.geometry
    windows = [canonical_window(c, geometry.grid) for c in candidates]
    unique = list(dict.fromkeys(windows))
    expanded, precs = expand(unique, precisions)
    todo = {k: v for k, v in groups.items() if k[0] >= skip_steps}
    runs_per_call = 1 + sum(w != geometry.grid or p != "native" for w, p in zip(expanded, precs))
    ticker = _Ticker(runs_per_call * sum(len(v) for v in todo.values()), progress)
    cost = CostModel.of(first.q, first.k, geometry)
    keys, evals = [], []
    for (step, layer), caps in todo.items():
        ticker.label = f"step {step} layer {layer}"
        per_sample = [evaluate(c.q, c.k, c.v, c.geometry, unique, precisions=precisions, cost=cost, tick=ticker)
                      for c in caps]
        keys.append((step, layer))
        evals.append(_mean_evaluation(per_sample))
    C, H = len(expanded), first.heads
    stack = (lambda name, shape: np.array([getattr(e, name) for e in evals]) if evals else np.zeros(shape))
    B, S, Hq, D = shape_bshd(first.q, geometry.layout)
    Hkv = shape_bshd(first.k, geometry.layout)[2]
    return SearchResult(expanded, keys, stack("mse", (0, C, H)), stack("l1", (0, C, H)), stack("energy", (0, H)),
                        np.array([cost.density(w) for w in expanded]), stack("flops", (0, C)),
                        np.array([e.dense_flops for e in evals]),
                        [k for k in groups if k[0] < skip_steps], int(skip_steps), geometry, (B, S, Hq, Hkv, D),
                        source, precisions=None if list(precisions) == ["native"] else precs)


@dataclass
class FrameSearchResult:
    """Loss of every number of global frames per layer (Efficient-vDiT's frame pattern search).

    loss[l, i] = mean over the layer's evaluated captures (steps >= skip_steps, all samples) of the mean over
    heads of the metric (default rel_mse) of global_frames[i] with the given radius against dense."""

    layers: list
    global_frames: list
    radius: int
    loss: np.ndarray  # [L, G]
    density: np.ndarray  # [G]
    metric: str
    skip_steps: int

    def select(self, threshold: float) -> dict:
        """{layer: (g, radius)}: the smallest g whose loss <= threshold (the paper's r); the dense frame count
        (T) when none is."""
        threshold = float(threshold)
        if not threshold >= 0:
            raise ValueError(f"invalid threshold = {threshold}: expected a number >= 0")
        out = {}
        order = np.argsort(self.global_frames, kind="stable")
        for i, layer in enumerate(self.layers):
            ok = [self.global_frames[j] for j in order if self.loss[i, j] <= threshold]
            out[layer] = (ok[0] if ok else self.dense_frames, self.radius)
        return out

    dense_frames: int = 0


def search_frame_patterns(captures: Sequence[Capture], *, global_frames: Optional[Sequence[int]] = None,
                          radius: int = 0, skip_steps: int = 0, metric: str = "rel_mse",
                          progress: Optional[Callable] = None) -> FrameSearchResult:
    """Evaluates attention_tile(g, radius) for every g (default 0 .. T, T = latent frames) on every captured
    (step, layer) with step >= skip_steps, and averages the loss per layer over steps and samples."""
    metric_of(metric, np.zeros((1, 1)), np.zeros((1, 1)), np.ones(1))
    if not captures:
        raise ValueError("invalid captures: none given")
    groups = _group(captures)
    geometry = captures[0].geometry
    T = geometry.latent[0]
    gs = sorted({min(int(g), T) for g in (range(T + 1) if global_frames is None else global_frames)})
    if not gs or gs[0] < 0:
        raise ValueError(f"invalid global_frames = {global_frames}: expected integers >= 0")
    todo = {k: v for k, v in groups.items() if k[0] >= skip_steps}
    cost = CostModel.of(captures[0].q, captures[0].k, geometry)
    dens = np.array([cost.frame_density(g, radius) for g in gs])
    runs = sum(len(v) * (1 + int(np.sum(dens < 1.0))) for v in todo.values())
    ticker = _Ticker(runs, progress)
    per_layer = defaultdict(list)
    for (step, layer), caps in todo.items():
        ticker.label = f"step {step} layer {layer}"
        for c in caps:
            e = evaluate_frames(c.q, c.k, c.v, c.geometry, gs, radius, cost=cost, tick=ticker)
            per_layer[layer].append(e.error(metric).mean(axis=1))
    layers = sorted(per_layer)
    loss = np.array([np.mean(per_layer[l], axis=0) for l in layers]) if layers else np.zeros((0, len(gs)))
    return FrameSearchResult(layers, gs, int(radius), loss, dens, metric, int(skip_steps), dense_frames=T)
