#!/usr/bin/env python3
"""Accuracy of precision="fp8" (docs/semantics.md §11) next to the bf16 path, against float64 attention.

One markdown table: per kind of input and per backend, the relative L2 error (over all outputs) of FP8 and of
bf16 against float64 attention on the same bf16 inputs, and their ratio, with K smoothing (what tilewise does) and
without it (the same run on e4m3 inputs whose K this script quantised from the unsmoothed keys, through the
fp8_scaled path, so everything else is tilewise's own arithmetic). A second table gives the floors of the formats:
the error when only Q and K are rounded (to e4m3, or to int8 as SageAttention does) and everything else is exact.

Inputs (fresh each run; the seed is printed, --seed repeats a run):
- random: q, k, v standard normal;
- DiT-like: q, k Student-t (4 degrees of freedom, heavy tails), the same 4 channels of q and k 20-50 times larger
  (the outlier channels of QK-normed DiTs), a mean key per head 3 times the keys' own spread, scores rescaled to a
  standard deviation of 2; v Student-t.
The float64 reference is tilewise's CPU reference on float64 copies of the bf16 inputs (tested against an
independent oracle to 1e-12). CPU rows run the CPU reference; CUDA rows (with --device cuda, or auto when a
Hopper GPU is present) run the Hopper kernels (bf16 and FP8) on the same inputs.

Usage: python3 bench/fp8_accuracy.py [--device auto|cpu|cuda] [--seed N] [--out table.md]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import tilewise  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from report import emit  # noqa: E402

LATENT, TILE, WINDOW = (8, 16, 16), (2, 4, 4), (3, 3, 3)   # grid 4x4x4: 27 of 64 key tiles per query tile
TEXT, TEXT_LEN, HEADS, HEAD_DIM = 64, 50, 2, 128


def inputs(kind: str, rng) -> tuple:
    S = int(np.prod(LATENT)) + TEXT
    shape = (1, S, HEADS, HEAD_DIM)
    if kind == "random":
        return tuple(rng.standard_normal(shape) for _ in range(3))
    q, k, v = (rng.standard_t(4, shape) for _ in range(3))
    channels = rng.choice(HEAD_DIM, 4, replace=False)
    factor = rng.uniform(20, 50, 4)
    q[..., channels] *= factor
    k[..., channels] *= factor
    k += 3 * k.std(axis=1, keepdims=True) * rng.standard_normal((1, 1, HEADS, HEAD_DIM))
    s = np.einsum("bihd,bjhd->bhij", q, k - k.mean(axis=1, keepdims=True)) / np.sqrt(HEAD_DIM)
    return q * (2 / s.std()), k, v


def key_blocks(text_len: int) -> tuple:
    """(each position's key block (§11.2), which positions are valid keys): text last, so video then valid text."""
    blocks = torch.tensor(tilewise.fp8_key_blocks(latent=LATENT, tile=TILE, text_capacity=TEXT))
    return blocks, torch.arange(blocks.numel()) < int(np.prod(LATENT)) + text_len


def block_amax(x: torch.Tensor, text_len: int) -> torch.Tensor:
    """[key blocks, H]: the largest |x| of each key block's valid keys per head, x: [S, H, D]."""
    blocks, visible = key_blocks(text_len)
    index = blocks[visible][:, None].expand(-1, x.shape[1])
    return torch.zeros(int(blocks.max()) + 1, x.shape[1], dtype=x.dtype).scatter_reduce_(
        0, index, x[visible].abs().amax(dim=2), "amax")


def unsmoothed_k(k: torch.Tensor, text_len: int) -> tuple:
    """K quantised per key block as §11.2 says, but from the keys themselves, not keys minus their mean."""
    blocks, _ = key_blocks(text_len)
    x = k.float()[0]                                                   # [S, H, D]
    amax = block_amax(x, text_len)
    scale = torch.where(amax > 0, amax / 448, torch.ones(()))
    inv = torch.where(amax > 0, 448 / amax, torch.ones(()))
    q8 = (x * inv[blocks][..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)  # in range: no saturation needed
    return q8[None], scale.T.contiguous()[None]


def rel_l2(x, ref: np.ndarray) -> float:
    x = x.float().cpu().double().numpy() if isinstance(x, torch.Tensor) else x
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def measure(kind: str, device: str, rng) -> list:
    """[(smoothing, fp8 error or None, bf16 error)] for one kind of input on one backend."""
    q, k, v = (torch.from_numpy(x).bfloat16() for x in inputs(kind, rng))
    kw = dict(latent=LATENT, tile=TILE, window=WINDOW, text_len=TEXT_LEN)
    exact = tilewise.sliding_tile_attention(*(t.double().numpy() for t in (q, k, v)), **kw)
    dev = torch.device(device)
    bf16 = rel_l2(tilewise.sliding_tile_attention(*(t.to(dev) for t in (q, k, v)), **kw), exact)
    if not tilewise.supports(device, "bf16", HEAD_DIM, "fp8"):
        return [("yes", None, bf16), ("no", None, bf16)]
    fp8 = rel_l2(tilewise.sliding_tile_attention(*(t.to(dev) for t in (q, k, v)), precision="fp8", **kw), exact)
    q8, _, v8, (q_scale, _, v_scale) = tilewise.quantize_fp8(q, k, v, latent=LATENT, tile=TILE, text_len=TEXT_LEN)
    k8, k_scale = unsmoothed_k(k, TEXT_LEN)
    scaled = (q8, k8, v8, q_scale, k_scale, v_scale)
    q8, k8, v8, q_scale, k_scale, v_scale = (t.to(dev) for t in scaled)
    raw = rel_l2(tilewise.sliding_tile_attention(q8, k8, v8, precision="fp8", scales=(q_scale, k_scale, v_scale),
                                                 **kw), exact)
    return [("yes", fp8, bf16), ("no", raw, bf16)]


def rounded_qk(q: torch.Tensor, k: torch.Tensor, fmt: str, text_len: int) -> tuple:
    """q and k (float64) after rounding to `fmt` with precision fp8's scales (§11.2: q per row, k smoothed by its mean
    valid key and scaled per key block), dequantised: what attention sees when only Q K^T is rounded."""
    q, k = q.double()[0], k.double()[0]                                 # [S, H, D]
    blocks, visible = key_blocks(text_len)
    k = k - k[visible].mean(dim=0)                                     # softmax is unchanged by a shift of all keys
    top = 448.0 if fmt == "e4m3" else 127.0

    def rnd(x, amax):
        scale = torch.where(amax > 0, amax / top, torch.ones(()))[..., None]
        y = x / scale
        y = y.to(torch.float8_e4m3fn).double() if fmt == "e4m3" else torch.round(y)
        return y * scale

    return rnd(q, q.abs().amax(dim=2))[None], rnd(k, block_amax(k, text_len)[blocks])[None]


def format_floors(seed: int) -> list:
    """Table lines: the error of attention whose only rounding is Q and K to e4m3 (or int8, SageAttention's choice),
    P and V exact, on the same inputs as the main table: the least any kernel with that Q K^T can reach."""
    lines = ["", "What the formats allow (float64 attention of the same inputs, only Q and K rounded, with the scales "
             "above; P, V and every sum exact):", "",
             "| inputs | Q K rounded to | rel L2 | / bf16 path |", "|---|---|---|---|"]
    kw = dict(latent=LATENT, tile=TILE, window=WINDOW, text_len=TEXT_LEN)
    for kind in ("random", "DiT-like"):
        rng = np.random.default_rng([seed, len(kind)])
        q, k, v = (torch.from_numpy(x).bfloat16() for x in inputs(kind, rng))
        exact = tilewise.sliding_tile_attention(*(t.double().numpy() for t in (q, k, v)), **kw)
        bf16 = rel_l2(tilewise.sliding_tile_attention(q, k, v, **kw), exact)
        for fmt in ("e4m3", "int8"):
            qr, kr = rounded_qk(q, k, fmt, TEXT_LEN)
            err = rel_l2(tilewise.sliding_tile_attention(qr.numpy(), kr.numpy(), v.double().numpy(), **kw), exact)
            lines.append(f"| {kind} | {fmt} | {err:.4f} | {err / bf16:.1f}x |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"seed {seed}", file=sys.stderr)
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" or (args.device == "auto" and tilewise.cuda_available())
                         else [])
    if args.device == "cpu":
        devices = ["cpu"]
    lines = [f"FP8 vs bf16 against float64: latent {'x'.join(map(str, LATENT))}, tile {'x'.join(map(str, TILE))}, "
             f"window {'x'.join(map(str, WINDOW))}, {TEXT_LEN} of {TEXT} text tokens, {HEADS} heads, D {HEAD_DIM}, "
             f"seed {seed}", "",
             "| inputs | backend | K smoothing | rel L2 fp8 | rel L2 bf16 | fp8 / bf16 |", "|---|---|---|---|---|---|"]
    for kind in ("random", "DiT-like"):
        for device in devices:
            rng = np.random.default_rng([seed, len(kind)])  # the same inputs on every backend
            for smoothing, fp8, bf16 in measure(kind, device, rng):
                f = "no kernel" if fp8 is None else f"{fp8:.4f}"
                ratio = "-" if fp8 is None else f"{fp8 / bf16:.1f}x"
                lines.append(f"| {kind} | {device} | {smoothing} | {f} | {bf16:.5f} | {ratio} |")
    emit("\n".join(lines + format_floors(seed)), args.out)


if __name__ == "__main__":
    main()
