"""Captured attention inputs: the problem geometry, and an on-disk format of npy files plus one JSON manifest
per capture.

A capture is the q, k, v of one attention call of one (denoising step, layer), for one sample (prompt, seed or
classifier-free-guidance branch). On disk, capture `<stem>` of a directory is

    <stem>.json      {"format": "tilewise-capture", "version": 1, "step": 12, "layer": 3, "sample": 0,
                      "q": "<stem>.q.npy", "k": "<stem>.k.npy", "v": "<stem>.v.npy",
                      "latent": [T, H, W], "tile": [tt, th, tw], "text_len": [20] | null,
                      "text_position": "last", "layout": "bshd", "scale": null, "source_dtype": "bfloat16"}
    <stem>.q.npy     q as [B, S, Hq, D] (layout "bshd") or [B, Hq, S, D] ("bhsd"), float16/float32/float64
    <stem>.k.npy     k likewise with Hkv heads
    <stem>.v.npy     v

One manifest per capture (rather than one for the directory) lets several processes (ranks, prompts) write into
the same directory without coordinating. `load_captures(dir)` reads every `*.json` whose "format" is
"tilewise-capture"; the arrays are memory-mapped and read when a search reaches them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from tilewise.calibrate import _backend
from tilewise.geometry import Geometry  # noqa: F401  (re-exported: the captures' geometry)

FORMAT = "tilewise-capture"
VERSION = 1


def _triple(name, value) -> tuple:
    try:
        t = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"invalid {name} = {value!r}: expected three integers (t, h, w)") from None
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"invalid {name} = {value!r}: expected three integers >= 1 (t, h, w)")
    return t


# The geometry type is tilewise.geometry.Geometry (shared with tilewise.diffusers).


def shape_bshd(x, layout: str) -> tuple:
    """(B, S, H, D) of an array in either layout."""
    s = tuple(x.shape)
    return s if layout == "bshd" else (s[0], s[2], s[1], s[3])


@dataclass
class Capture:
    """One captured attention call. q, k, v are numpy arrays (memory-mapped when loaded from disk) or tensors."""

    step: int
    layer: int
    q: object
    k: object
    v: object
    geometry: Geometry
    sample: int = 0
    path: Optional[Path] = field(default=None, compare=False)

    @property
    def heads(self) -> int:
        return shape_bshd(self.q, self.geometry.layout)[2]

    def to_torch(self, device="cuda", dtype=None) -> "Capture":
        """The same capture with torch tensors on `device` (e.g. to search on the Hopper kernel)."""
        import torch

        conv = [torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype) for x in
                (self.q, self.k, self.v)]
        return Capture(self.step, self.layer, *conv, geometry=self.geometry, sample=self.sample, path=self.path)


def _host_array(x) -> np.ndarray:
    a = np.ascontiguousarray(_backend.to_host_numpy(x))
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"captured arrays must be float16, bfloat16, float32 or float64, got {a.dtype}")
    return a


def _save_npy(path: Path, a: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, a)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_capture(directory, *, step: int, layer: int, q, k, v, geometry: Geometry, sample: int = 0) -> Path:
    """Writes one capture (q, k, v as numpy arrays or torch tensors; bfloat16 is stored as float32) into
    `directory` and returns the path of its manifest. The manifest is written last, so a reader never sees a
    capture whose arrays are incomplete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in (("step", step), ("layer", layer), ("sample", sample)):
        if int(value) < 0:
            raise ValueError(f"invalid {name} = {value}: expected an integer >= 0")
    arrays = {"q": _host_array(q), "k": _host_array(k), "v": _host_array(v)}
    for name, a in arrays.items():
        if a.ndim != 4:
            raise ValueError(f"invalid {name}.ndim = {a.ndim}: expected 4 ([B, S, H, D] or [B, H, S, D])")
    B, S, H, D = shape_bshd(arrays["q"], geometry.layout)
    if geometry.video_tokens > S:
        raise ValueError(f"invalid latent = {geometry.latent}: T*H*W = {geometry.video_tokens} exceeds the "
                         f"sequence length S = {S} of q")
    source_dtype = str(getattr(q, "dtype", arrays["q"].dtype)).replace("torch.", "")
    stem = f"step{int(step):04d}_layer{int(layer):03d}_sample{int(sample):03d}"
    manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "layer": int(layer),
                "sample": int(sample), **geometry.to_json(), "source_dtype": source_dtype}
    for name, a in arrays.items():
        file = f"{stem}.{name}.npy"
        _atomic_write(directory / file, lambda p, a=a: _save_npy(p, a))
        manifest[name] = file
    path = directory / f"{stem}.json"
    _atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))
    return path


def load_captures(directory, *, mmap: bool = True) -> list:
    """Every capture in `directory`, sorted by (step, layer, sample). Arrays are memory-mapped by default."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"invalid captures directory = {str(directory)!r}: not a directory")
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid capture manifest {path}: {e}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            continue
        if m.get("version", 1) > VERSION:
            raise ValueError(f"invalid capture manifest {path}: version {m['version']} is newer than this "
                             f"tilewise reads ({VERSION})")
        try:
            arrays = [np.load(directory / m[name], mmap_mode="r" if mmap else None) for name in ("q", "k", "v")]
            out.append(Capture(int(m["step"]), int(m["layer"]), *arrays, geometry=Geometry.from_json(m),
                               sample=int(m.get("sample", 0)), path=path))
        except (KeyError, OSError, ValueError) as e:
            raise ValueError(f"invalid capture manifest {path}: {e}") from None
    if not out:
        raise ValueError(f"invalid captures directory = {str(directory)!r}: no capture manifests "
                         f"(*.json with \"format\": \"{FORMAT}\") in it")
    out.sort(key=lambda c: (c.step, c.layer, c.sample))
    return out
