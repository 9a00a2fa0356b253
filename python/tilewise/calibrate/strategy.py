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
      "frame_patterns": {"<layer>": [global_frames, radius], ...}
    }

Windows use tilewise's semantics (docs/semantics.md §4.1); a window equal to the grid is dense. Frame patterns
(Efficient-vDiT's attention tile) are per layer and apply from step `skip_steps` on; a layer without one is
dense. Windows and frame patterns are separate key spaces: the integration picks one pattern per layer.

FastVideo format (`Strategy.save_fastvideo`, and `Strategy.load` when the file is one): a flat JSON object
`{"<step>_<layer>_<head>": [kt, kh, kw]}` with every key present. FastVideo centres an even window `k` (k/2
tiles on both sides, k+1 in all) whereas tilewise's even window covers k tiles (k/2 before, k/2 - 1 after), so
even windows smaller than the grid are refused in both directions, with the key named; a window >= the grid
(whole axis) means the same in both.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

FORMAT = "tilewise-strategy"
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
    t = tuple(int(x) for x in value)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"invalid {name} = {value!r}: expected three integers >= 1")
    return t


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
        grid = tuple(-(-n // t) for n, t in zip(latent, tile))
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
    default: Optional[tuple] = None               # None: dense (the grid window)
    skip_steps: int = 0
    frame_patterns: dict = field(default_factory=dict)  # layer -> (global_frames, radius)
    search: dict = field(default_factory=dict)

    def __post_init__(self):
        self.grid, self.latent, self.tile = _grid_of(self.grid, self.latent, self.tile)
        self.default = _opt_triple(self.default, "default")
        self.windows = {tuple(int(x) for x in k): tuple(int(x) for x in w) for k, w in self.windows.items()}
        self.frame_patterns = {int(l): (int(g), int(r)) for l, (g, r) in self.frame_patterns.items()}

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
            return self.default
        if self.grid is not None:
            return self.grid
        raise KeyError(f"no window for step {step}, layer {layer}, head {head}, and neither a default nor a grid "
                       "to fall back to")

    def windows_for(self, step: int, layer: int, num_heads: int, head_offset: int = 0) -> list:
        """Per-head windows of one attention call (heads head_offset .. head_offset + num_heads - 1, for
        sequence parallelism), ready for tilewise.sliding_tile_attention(window=...)."""
        return [self.window(step, layer, head_offset + h) for h in range(num_heads)]

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
            "default": list(self.default) if self.default else None,
            "skip_steps": self.skip_steps,
            "search": self.search,
            "windows": {format_key(*k): list(w) for k, w in sorted(self.windows.items())},
            "frame_patterns": {str(l): list(p) for l, p in sorted(self.frame_patterns.items())},
        }

    def save(self, path) -> None:
        """Writes the tilewise format (one window per line)."""
        d = self.to_json()
        head = {k: v for k, v in d.items() if k not in ("windows", "frame_patterns")}
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
        lines += _table_lines("windows", d["windows"]) + [","]
        lines += _table_lines("frame_patterns", d["frame_patterns"]) + ["}"]
        text = "\n".join(lines).replace("\n,\n", ",\n") + "\n"
        Path(path).write_text(text)

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
        return cls(windows=windows, grid=d.get("grid"), latent=d.get("latent"), tile=d.get("tile"),
                   default=d.get("default"), skip_steps=int(d.get("skip_steps", 0)), frame_patterns=frames,
                   search=d.get("search") or {})

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
        Path(path).write_text("\n".join(_table_lines(None, table)) + "\n")


def _table_lines(name, table: dict) -> list:
    items = [f"  {'  ' if name else ''}{json.dumps(k)}: {json.dumps(v)}" for k, v in table.items()]
    body = [x + "," for x in items[:-1]] + items[-1:]
    if name is None:
        return ["{"] + body + ["}"]
    return [f"  {json.dumps(name)}: {{"] + body + ["  }"]
