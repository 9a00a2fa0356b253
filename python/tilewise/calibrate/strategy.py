"""Calibrated strategies: per-(step, layer, head) STA windows and per-layer frame patterns, in tilewise's JSON
format and in FastVideo's `mask_strategy` format.

tilewise format (what `Strategy.save` writes and `Strategy.load` reads):

    {
      "format": "tilewise-strategy", "version": 1,
      "latent": [T, H, W], "tile": [tt, th, tw], "grid": [nt, nh, nw],     # the geometry it was searched on
      "default": null,          # window for keys not in "windows"; null = dense (the grid window)
      "skip_steps": 10,         # steps < skip_steps are dense (explicit grid windows in "windows" too)
      "search": {...},          # how it was made (metric, budget or argmin, candidates, ...); informative
      "windows": {"<step>_<layer>_<head>": [kt, kh, kw], ...},
      "frame_patterns": {"<layer>": [global_frames, radius], ...},
      "fp8": ["<step>_<layer>_<head>", ...]   # heads whose calibration chose FP8 (docs/semantics.md §11)
    }

Windows use tilewise's semantics (docs/semantics.md §4.1); a window equal to the grid is dense. Frame patterns
(Efficient-vDiT's attention tile) are per layer and apply from step `skip_steps` on; a layer without one is
dense. Windows and frame patterns are separate key spaces: the integration picks one pattern per layer.
FP8 is recorded per (step, layer, head); a call runs one precision, so a (step, layer) runs FP8 when every one
of its heads chose it (`Strategy.precision`).

FastVideo format (`Strategy.save_fastvideo`, and `Strategy.load` when the file is one): a flat JSON object
`{"<step>_<layer>_<head>": [kt, kh, kw]}` with every key present. FastVideo centres an even window `k` (k/2
tiles on both sides, k+1 in all) whereas tilewise's even window covers k tiles (k/2 before, k/2 - 1 after), so
even windows smaller than the grid are refused in both directions, with the key named; a window >= the grid
(whole axis) means the same in both.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tilewise import _args, _capi

FORMAT = "tilewise-strategy"
FULL_WINDOW = (1 << 20, 1 << 20, 1 << 20)  # larger than any tile grid: the library clamps it to the whole axis
VERSION = 1
AXES = ("t", "h", "w")
_KEY = re.compile(r"^(\d+)_(\d+)_(\d+)$")


def _window(value, where: str) -> tuple:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)):
        raise ValueError(f"invalid {where} = {json.dumps(value)}: expected [kt, kh, kw], three integers >= 1")
    return tuple(value)


def _opt_triple(value, name):
    if value is None:
        return None
    t = _args.triple(name, value)
    if min(t) < 1:
        raise ValueError(f"invalid {name} = {value!r}: expected three integers >= 1")
    return t


def _default_windows(value):
    """`default`: None (dense), one window, or one window per head (a tuple of windows)."""
    if value is None:
        return None
    windows = _args.windows(value, "default")
    for h, w in enumerate(windows):
        if min(w) < 1:
            raise ValueError(f"invalid default = {value!r}: expected windows of three integers >= 1")
    return windows[0] if len(windows) == 1 and not (_args.is_sequence(value) and value and
                                                    _args.is_sequence(value[0])) else windows


def parse_key(key: str, where: str = "strategy") -> tuple:
    m = _KEY.match(key) if isinstance(key, str) else None
    if not m:
        raise ValueError(f"invalid {where} key {key!r}: expected \"<step>_<layer>_<head>\" (three integers)")
    return tuple(int(x) for x in m.groups())


def format_key(step: int, layer: int, head: int) -> str:
    return f"{step}_{layer}_{head}"


def format_window(w) -> str:
    return "x".join(str(x) for x in w)


def _fastvideo_even_error(key: str, w: tuple, grid: Optional[tuple], source: str) -> Optional[str]:
    """Why window w cannot be exchanged with FastVideo, or None when it can."""
    for axis, k, name in zip(range(3), w, AXES):
        if k % 2:
            continue
        if grid is None:
            return (f"invalid mask_strategy entry \"{key}\" = {list(w)} in {source}: even window {k} along {name} "
                    "needs the grid (tiles per axis) to be read: FastVideo and tilewise agree on an even window "
                    "only when it covers the whole axis; pass grid= (or latent= and tile=)")
        n = grid[axis]
        if k < n:
            return (f"invalid mask_strategy entry \"{key}\" = {list(w)} in {source}: even window {k} along {name} "
                    f"is smaller than the grid ({n} tiles): FastVideo centres it ({k // 2} tiles on both sides, "
                    f"{k + 1} in all) while tilewise takes {k // 2} before and {k // 2 - 1} after ({k} in all), so "
                    f"the two select different keys; use {k + 1} for FastVideo's keys (even_windows=\"widen\" "
                    "does that when reading)")
    return None


def _grid_of(grid, latent, tile):
    grid = _opt_triple(grid, "grid")
    latent, tile = _opt_triple(latent, "latent"), _opt_triple(tile, "tile")
    if grid is None and latent is not None and tile is not None:
        grid = _capi.tile_grid(latent, tile)
    return grid, latent, tile


@dataclass
class Strategy:
    """Windows per (step, layer, head) plus frame patterns per layer.

        s = Strategy.load("strategy.json")
        windows = s.windows_for(step, layer, num_heads)     # list of (kt, kh, kw), one per head
        pattern = s.frame_pattern(step, layer)              # (global_frames, radius), or None for dense
    """

    windows: dict = field(default_factory=dict)   # (step, layer, head) -> (kt, kh, kw)
    grid: Optional[tuple] = None
    latent: Optional[tuple] = None
    tile: Optional[tuple] = None
    default: Optional[tuple] = None               # None: dense (the grid window); a window, or one per head
    skip_steps: int = 0
    frame_patterns: dict = field(default_factory=dict)  # layer -> (global_frames, radius)
    search: dict = field(default_factory=dict)
    fp8: frozenset = frozenset()                  # (step, layer, head) keys that run in FP8

    def __post_init__(self):
        self.grid, self.latent, self.tile = _grid_of(self.grid, self.latent, self.tile)
        self.default = _default_windows(self.default)
        self.windows = {tuple(_args.integer("windows key", x) for x in k): _args.window(f"window {k}", w)
                        for k, w in self.windows.items()}
        self.frame_patterns = {_args.integer("frame_patterns key", l): (_args.integer("global_frames", g),
                                                                        _args.integer("radius", r))
                               for l, (g, r) in self.frame_patterns.items()}
        self.skip_steps = _args.integer("skip_steps", self.skip_steps)
        self.fp8 = frozenset(tuple(_args.integer("fp8 key", x) for x in k) for k in self.fp8)

    # --- lookups -------------------------------------------------------------------------------------------
    @property
    def dense_window(self) -> tuple:
        if self.grid is None:
            raise KeyError("this strategy has no grid, so its dense window is unknown: give grid= (or latent= "
                           "and tile=)")
        return self.grid

    def window(self, step: int, layer: int, head: int) -> tuple:
        """The window of (step, layer, head); `default` (or dense, the grid window) when the key is missing."""
        w = self.windows.get((step, layer, head))
        if w is not None:
            return w
        if self.default is not None:
            return self._default_of(head)
        if self.grid is not None:
            return self.grid
        raise KeyError(f"no window for step {step}, layer {layer}, head {head}, and neither a default nor a grid "
                       "to fall back to")

    def windows_for(self, step: int, layer: int, num_heads: int, head_offset: int = 0) -> list:
        """Per-head windows of one attention call (heads head_offset .. head_offset + num_heads - 1, for
        sequence parallelism), ready for tilewise.sliding_tile_attention(window=...)."""
        return [self.window(step, layer, head_offset + h) for h in range(num_heads)]

    def _default_of(self, head: int) -> tuple:
        if isinstance(self.default[0], tuple):  # one per head
            if head >= len(self.default):
                raise ValueError(f"invalid head {head}: the strategy's default has {len(self.default)} per-head "
                                 "windows")
            return self.default[head]
        return self.default

    def _by_call(self) -> dict:
        """{(step, layer): {head: window}}, built once (windows are not meant to change after construction)."""
        if getattr(self, "_calls", None) is None or self._calls[0] is not self.windows:
            table: dict = {}
            for (step, layer, head), w in self.windows.items():
                table.setdefault((step, layer), {})[head] = w
            self._calls = (self.windows, table)
        return self._calls[1]

    @property
    def per_step(self) -> bool:
        """Whether the windows depend on the denoising step or layer (else `default` holds for every call)."""
        return bool(self.windows or self.frame_patterns)

    def pattern(self, step: Optional[int], layer: int, num_heads: int, head_offset: int = 0):
        """The pattern of one attention call: ("sta", windows) with one window (for every head) or one per head,
        ("frame", (global_frames, radius)), or None where the call stays dense. Keys of the (step, layer) win;
        then the layer's frame pattern from skip_steps on; then `default`. A head missing from a (step, layer)
        that has keys gets `default`, or the whole grid (FULL_WINDOW when the grid is unknown)."""
        heads = range(head_offset, head_offset + num_heads)
        entry = None if step is None else self._by_call().get((step, layer))
        if entry:
            bad = [h for h in entry if h not in heads]
            if bad:
                raise ValueError(f"invalid strategy key '{format_key(step, layer, bad[0])}': layer {layer} has "
                                 f"{num_heads} heads" + (f" (from head {head_offset})" if head_offset else ""))
            fill = (lambda h: self._default_of(h)) if self.default is not None else \
                (lambda h: self.grid or FULL_WINDOW)
            return ("sta", tuple(entry.get(h) or fill(h) for h in heads))
        frames = None if step is None else self.frame_pattern(step, layer)
        if frames is not None:
            return ("frame", frames)
        if self.default is not None:
            if isinstance(self.default[0], tuple):
                return ("sta", tuple(self._default_of(h) for h in heads))
            return ("sta", (self.default,))
        return None

    @classmethod
    def coerce(cls, value, tile=None) -> "Strategy":
        """A Strategy from any form tilewise takes (tilewise.diffusers.enable's `strategy`):
        - a Strategy; a tilewise strategy dict or file ("format": "tilewise-strategy");
        - one window for every call, (kt, kh, kw) or "KTxKHxKW", or one per head; {"window": ..., "tile": ...};
        - a table {"<step>_<layer>_<head>": [kt, kh, kw]} (a dict or a JSON file) in tilewise's window semantics
          (to read a FastVideo file with even windows, use Strategy.load(..., even_windows="widen")).
        tile: overrides an unset tile, and must agree with a set one."""
        s = cls._coerce(value)
        if tile is not None:
            tile = _opt_triple(tile, "tile")
            if s.tile is not None and s.tile != tile:
                raise ValueError(f"invalid tile = {tile}: the strategy was made for tile {s.tile}")
            s = cls(windows=s.windows, grid=s.grid if s.latent else None, latent=s.latent, tile=tile,
                    default=s.default, skip_steps=s.skip_steps, frame_patterns=s.frame_patterns, search=s.search,
                    fp8=s.fp8)
        return s

    @classmethod
    def _coerce(cls, value) -> "Strategy":
        if isinstance(value, cls):
            return value
        if isinstance(value, os.PathLike) or (isinstance(value, str) and not _args._WINDOW_TEXT.match(value)):
            try:
                value = json.loads(Path(value).read_text())
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"invalid strategy = {str(value)!r}: expected a window, a table or the path of a "
                                 f"JSON strategy file ({e})") from None
        if isinstance(value, dict) and value.get("format") == FORMAT:
            return cls.from_json(value)
        if isinstance(value, dict) and "window" in value:
            unknown = set(value) - {"window", "tile"}
            if unknown:
                raise ValueError(f"invalid strategy keys {sorted(unknown)}: expected 'window' and optionally 'tile'")
            return cls(default=cls._coerce(value["window"]).default, tile=value.get("tile"))
        if isinstance(value, dict):
            windows = {}
            for key, w in value.items():
                windows[parse_key(key, "strategy")] = _args.window(f"strategy[{key!r}]", w)
            return cls(windows=windows)
        try:
            return cls(default=value)
        except (TypeError, ValueError):
            raise ValueError(f"invalid strategy = {value!r}: expected a window (kt, kh, kw) or 'KTxKHxKW', one "
                             "window per head, {'window': ..., 'tile': ...}, or a table (dict or JSON path) keyed "
                             "'<step>_<layer>_<head>'") from None

    def precision(self, step: Optional[int], layer: int, num_heads: int, head_offset: int = 0) -> str:
        """"fp8" when every head of the call (step, layer) is an FP8 key, else "native": a call runs one
        precision, so a layer whose heads disagree keeps the more accurate one."""
        if step is None or not self.fp8:
            return "native"
        heads = range(head_offset, head_offset + num_heads)
        return "fp8" if all((step, layer, h) in self.fp8 for h in heads) else "native"

    def frame_pattern(self, step: int, layer: int) -> Optional[tuple]:
        """(global_frames, radius) of layer at step, or None where the layer stays dense."""
        if step < self.skip_steps:
            return None
        return self.frame_patterns.get(layer)

    @property
    def steps(self) -> list:
        return sorted({k[0] for k in self.windows})

    @property
    def layers(self) -> list:
        return sorted({k[1] for k in self.windows})

    @property
    def num_heads(self) -> int:
        return 1 + max((k[2] for k in self.windows), default=-1)

    def is_dense(self, window) -> bool:
        return self.grid is not None and all(k >= n for k, n in zip(window, self.grid))

    # --- tilewise format -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION,
            "latent": list(self.latent) if self.latent else None,
            "tile": list(self.tile) if self.tile else None,
            "grid": list(self.grid) if self.grid else None,
            "default": None if self.default is None else
            [list(w) for w in self.default] if isinstance(self.default[0], tuple) else list(self.default),
            "skip_steps": self.skip_steps,
            "search": self.search,
            "windows": {format_key(*k): list(w) for k, w in sorted(self.windows.items())},
            "frame_patterns": {str(l): list(p) for l, p in sorted(self.frame_patterns.items())},
            "fp8": [format_key(*k) for k in sorted(self.fp8)],
        }

    def save(self, path) -> None:
        """Writes the tilewise format."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_json(cls, d: dict, source: str = "strategy") -> "Strategy":
        if d.get("format") != FORMAT:
            raise ValueError(f"invalid {source}: \"format\" is {d.get('format')!r}, expected {FORMAT!r}")
        if int(d.get("version", 1)) > VERSION:
            raise ValueError(f"invalid {source}: version {d['version']} is newer than this tilewise reads "
                             f"({VERSION})")
        windows = {}
        for key, value in (d.get("windows") or {}).items():
            windows[parse_key(key, source)] = _window(value, f"window \"{key}\" in {source}")
        frames = {}
        for key, value in (d.get("frame_patterns") or {}).items():
            if not str(key).isdigit():
                raise ValueError(f"invalid frame_patterns key {key!r} in {source}: expected a layer index")
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or not all(isinstance(x, int) and x >= 0 for x in value)):
                raise ValueError(f"invalid frame pattern \"{key}\" = {json.dumps(value)} in {source}: expected "
                                 "[global_frames, radius], two integers >= 0")
            frames[int(key)] = tuple(value)
        fp8 = d.get("fp8") or []
        if not isinstance(fp8, list):
            raise ValueError(f"invalid \"fp8\" = {json.dumps(fp8)} in {source}: expected a list of "
                             "\"<step>_<layer>_<head>\" keys")
        return cls(windows=windows, grid=d.get("grid"), latent=d.get("latent"), tile=d.get("tile"),
                   default=d.get("default"), skip_steps=int(d.get("skip_steps", 0)), frame_patterns=frames,
                   search=d.get("search") or {}, fp8=frozenset(parse_key(k, f"{source} fp8") for k in fp8))

    @classmethod
    def load(cls, path, *, grid=None, latent=None, tile=None, even_windows: str = "refuse") -> "Strategy":
        """Reads a tilewise strategy or a FastVideo mask_strategy file (detected from its content). FastVideo
        files carry no geometry: pass grid= (tiles per axis) or latent= and tile= so that their even windows can
        be checked; even_windows="widen" reads FastVideo's centred even window k as tilewise's k + 1."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid strategy file {path}: {e}") from None
        if isinstance(d, dict) and d.get("format") == FORMAT:
            s = cls.from_json(d, source=str(path))
            g, la, ti = _grid_of(grid, latent, tile)
            if g is not None and s.grid is not None and g != s.grid:
                raise ValueError(f"invalid grid = {g} for {path}: the strategy was searched on grid {s.grid}")
            return s
        if isinstance(d, dict) and d and all(isinstance(k, str) and _KEY.match(k) for k in d):
            return cls.from_fastvideo(d, grid=grid, latent=latent, tile=tile, even_windows=even_windows,
                                      source=str(path))
        raise ValueError(f"invalid strategy file {path}: neither a tilewise strategy (\"format\": \"{FORMAT}\") "
                         "nor a FastVideo mask_strategy ({\"<step>_<layer>_<head>\": [kt, kh, kw], ...})")

    # --- FastVideo format ----------------------------------------------------------------------------------
    @classmethod
    def from_fastvideo(cls, d: dict, *, grid=None, latent=None, tile=None, even_windows: str = "refuse",
                       source: str = "mask_strategy") -> "Strategy":
        if even_windows not in ("refuse", "widen"):
            raise ValueError(f"invalid even_windows = {even_windows!r}: expected 'refuse' or 'widen'")
        g, latent, tile = _grid_of(grid, latent, tile)
        windows = {}
        for key, value in d.items():
            w = _window(value, f"mask_strategy entry \"{key}\" in {source}")
            problem = _fastvideo_even_error(key, w, g, source)
            if problem and even_windows == "widen" and g is not None:
                w = tuple(k + 1 if k % 2 == 0 and k < n else k for k, n in zip(w, g))
            elif problem:
                raise ValueError(problem)
            windows[parse_key(key, source)] = w
        return cls(windows=windows, grid=g, latent=latent, tile=tile, search={"source": "fastvideo"})

    def to_fastvideo(self, num_steps: Optional[int] = None, num_layers: Optional[int] = None,
                     num_heads: Optional[int] = None) -> dict:
        """FastVideo's table with every (step, layer, head) below the given counts (default: one past the largest
        index present) filled in, missing keys taking `window()`'s default. Refuses even windows smaller than
        the grid, naming the key."""
        keys = self.windows.keys()
        ns = num_steps if num_steps is not None else 1 + max((k[0] for k in keys), default=-1)
        nl = num_layers if num_layers is not None else 1 + max((k[1] for k in keys), default=-1)
        nh = num_heads if num_heads is not None else 1 + max((k[2] for k in keys), default=-1)
        out = {}
        for t in range(ns):
            for l in range(nl):
                for h in range(nh):
                    key, w = format_key(t, l, h), self.window(t, l, h)
                    problem = _fastvideo_even_error(key, w, self.grid, "the strategy")
                    if problem:
                        raise ValueError(problem.replace("(even_windows=\"widen\" does that when reading)",
                                                         "(FastVideo cannot express tilewise's even window)"))
                    out[key] = list(w)
        return out

    def save_fastvideo(self, path, num_steps=None, num_layers=None, num_heads=None) -> None:
        table = self.to_fastvideo(num_steps, num_layers, num_heads)
        with open(path, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
