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


def _manifest_problem(path: Path, field: str, value, expected: str) -> ValueError:
    shown = value if isinstance(value, str) else json.dumps(value) if _jsonable(value) else repr(value)
    return ValueError(f"invalid capture {path}: \"{field}\" = {shown}: expected {expected}")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _index(m: dict, path: Path, field: str, default=None) -> int:
    if field not in m and default is None:
        raise ValueError(f"invalid capture {path}: \"{field}\" is missing: expected an integer >= 0")
    value = m.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _manifest_problem(path, field, value, "an integer >= 0")
    return value


def _geometry(m: dict, path: Path) -> Geometry:
    """The manifest's geometry, every field checked and named."""
    if "latent" not in m:
        raise ValueError(f"invalid capture {path}: \"latent\" is missing: expected [T, H, W], the latent grid of "
                         "the captured call")
    triples = {}
    for field in ("latent", "tile"):
        value = m.get(field)
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)):
            raise _manifest_problem(path, field, value, "three integers >= 1 (t, h, w)")
        triples[field] = value
    text_len = m.get("text_len")
    ok = text_len is None or (isinstance(text_len, int) and not isinstance(text_len, bool) and text_len >= 0) or (
        isinstance(text_len, list) and text_len
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in text_len))
    if not ok:
        raise _manifest_problem(path, "text_len", text_len, "null (every text position valid), an integer >= 0 or "
                                "a list of them (one per batch element)")
    for field, choices in (("text_position", ("last", "first")), ("layout", ("bshd", "bhsd"))):
        if m.get(field, choices[0]) not in choices:
            raise _manifest_problem(path, field, m[field], " or ".join(f'"{c}"' for c in choices))
    scale = m.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise _manifest_problem(path, "scale", scale, "null (1/sqrt(head dim)) or a number > 0")
    return Geometry.from_json(m)


def _load_array(directory: Path, path: Path, m: dict, name: str, mmap: bool) -> np.ndarray:
    file = m.get(name)
    if not isinstance(file, str) or not file:
        raise _manifest_problem(path, name, file, f"the name of the {name} .npy file")
    npy = directory / file
    try:
        a = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"invalid capture {path}: \"{name}\" = {file}: {npy} does not exist") from None
    except (OSError, ValueError, EOFError) as e:  # empty, truncated or not an .npy file
        raise ValueError(f"invalid capture {path}: \"{name}\" = {file}: {npy} is not a complete .npy array "
                         f"({e})") from None
    if not isinstance(a, np.ndarray) or a.ndim != 4:
        raise ValueError(f"invalid capture {path}: \"{name}\" = {file}: {npy} has shape "
                         f"{getattr(a, 'shape', None)}: expected 4 dimensions ([B, S, H, D] or [B, H, S, D])")
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"invalid capture {path}: \"{name}\" = {file}: {npy} holds {a.dtype}: expected float16, "
                         "float32 or float64")
    return a


def _check_shapes(path: Path, m: dict, g: Geometry, q, k, v) -> None:
    """q, k, v agree with each other and with the geometry (the attention functions would refuse them later,
    in the middle of a search)."""
    (B, S, Hq, D), (Bk, Sk, Hk, Dk) = shape_bshd(q, g.layout), shape_bshd(k, g.layout)
    if (Bk, Sk, Dk) != (B, S, D) or shape_bshd(v, g.layout) != (Bk, Sk, Hk, Dk) or Hq % Hk:
        raise ValueError(f"invalid capture {path}: q, k, v have shapes {q.shape}, {k.shape}, {v.shape} (layout "
                         f"{g.layout}): expected the same batch, sequence and head dim, k and v alike, and k's "
                         "heads dividing q's")
    if g.video_tokens > S:
        raise _manifest_problem(path, "latent", list(g.latent), f"a grid of at most S = {S} tokens (the sequence "
                                f"length of q), but T*H*W = {g.video_tokens}")
    capacity = S - g.video_tokens
    lens = g.text_len_list(B)
    if lens is not None and (len(lens) != B or max(lens) > capacity):
        raise _manifest_problem(path, "text_len", m.get("text_len"), f"{B} value(s) <= {capacity}, the text "
                                f"positions of the sequence (S = {S} minus {g.video_tokens} video tokens)")


def load_captures(directory, *, mmap: bool = True) -> list:
    """Every capture in `directory`, sorted by (step, layer, sample). Arrays are memory-mapped by default.

    Every manifest field and array is checked here, before a search starts: an error names the manifest, the
    field and the value. Other JSON files (format not "tilewise-capture") are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"invalid captures directory = {str(directory)!r}: not a directory")
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            m = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"invalid capture manifest {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
                from None
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid capture manifest {path}: not valid JSON ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            continue
        version = m.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise _manifest_problem(path, "version", version, f"at most {VERSION}, the capture format this "
                                    "tilewise reads")
        step, layer, sample = _index(m, path, "step"), _index(m, path, "layer"), _index(m, path, "sample", 0)
        g = _geometry(m, path)
        q, k, v = (_load_array(directory, path, m, name, mmap) for name in ("q", "k", "v"))
        _check_shapes(path, m, g, q, k, v)
        out.append(Capture(step, layer, q, k, v, geometry=g, sample=sample, path=path))
    if not out:
        raise ValueError(f"invalid captures directory = {str(directory)!r}: no capture manifests "
                         f"(*.json with \"format\": \"{FORMAT}\") in it")
    out.sort(key=lambda c: (c.step, c.layer, c.sample))
    return out


# Elements per chunk of the finiteness check (8 MiB of float64 booleans and temporaries at most).
_FINITE_CHUNK = 1 << 20


def check_finite(captures, progress=None) -> None:
    """Refuses captures holding NaN or Inf (their errors would be NaN, and a strategy chosen from them
    meaningless), naming the file. Reads every array once, chunk by chunk; progress(done, total, label) after
    each capture."""
    for n, c in enumerate(captures):
        for name in ("q", "k", "v"):
            flat = np.asarray(getattr(c, name)).reshape(-1)
            bad = 0
            for start in range(0, flat.size, _FINITE_CHUNK):
                bad += int(flat.size and np.count_nonzero(~np.isfinite(flat[start:start + _FINITE_CHUNK])))
            if bad:
                where = f"capture {c.path}" if c.path else f"capture of step {c.step} layer {c.layer} sample {c.sample}"
                file = getattr(getattr(c, name), "filename", None)
                raise ValueError(f"invalid {where}: \"{name}\"{f' = {Path(file).name}' if file else ''} holds "
                                 f"{bad} NaN or Inf value(s) of {flat.size}: expected finite numbers (was the "
                                 "model run in a precision that overflows?)")
        if progress:
            progress(n + 1, len(captures), f"step {c.step} layer {c.layer}")
