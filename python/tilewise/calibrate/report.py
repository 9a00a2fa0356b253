"""Calibration report: a text summary (sparsity and expected attention speedup per step), a heatmap of the chosen
windows' density per (layer, head), and a plot of error vs sparsity per candidate.

The PNGs are written with zlib and numpy only (no plotting dependency); their few labels use a built-in 3x5
digit font, and the axes are described in the summary text.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from tilewise.calibrate.search import CostModel, FrameSearchResult, SearchResult
from tilewise.calibrate.strategy import Strategy, format_window

# ----------------------------------------------------------------------------------------------------------------
# PNG


def write_png(path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG of an [H, W, 3] uint8 array (filter 0 on every row)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"invalid image with shape {rgb.shape}: expected [H, W, 3]")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


# Dark blue -> violet -> orange -> pale yellow, linear in between.
_ANCHORS = np.array([[20, 24, 82], [94, 40, 140], [196, 70, 90], [246, 150, 50], [250, 240, 160]], float)


def colormap(x) -> np.ndarray:
    x = np.clip(np.nan_to_num(np.asarray(x, float), nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(x.astype(int), len(_ANCHORS) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * _ANCHORS[i] + f * _ANCHORS[i + 1]).astype(np.uint8)


_GLYPHS = {  # 3 wide x 5 tall
    "0": ["111", "101", "101", "101", "111"], "1": ["010", "110", "010", "010", "111"],
    "2": ["111", "001", "111", "100", "111"], "3": ["111", "001", "111", "001", "111"],
    "4": ["101", "101", "111", "001", "001"], "5": ["111", "100", "111", "001", "111"],
    "6": ["111", "100", "111", "101", "111"], "7": ["111", "001", "010", "010", "010"],
    "8": ["111", "101", "111", "101", "111"], "9": ["111", "101", "111", "001", "111"],
    ".": ["000", "000", "000", "000", "010"], "-": ["000", "000", "111", "000", "000"],
    "e": ["000", "111", "111", "100", "111"], "%": ["101", "001", "010", "100", "101"],
    "x": ["000", "101", "010", "101", "000"], " ": ["000"] * 5,
}


def draw_text(img: np.ndarray, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 2) -> None:
    """Draws `text` (digits and . - e % x) with its top-left corner at (x, y); clipped to the image."""
    for n, ch in enumerate(text):
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for r, row in enumerate(glyph):
            for c, bit in enumerate(row):
                if bit == "1":
                    y0, x0 = y + r * scale, x + (n * 4 + c) * scale
                    img[max(y0, 0):max(y0 + scale, 0), max(x0, 0):max(x0 + scale, 0)] = color


def text_width(text: str, scale: int = 2) -> int:
    return (4 * len(text) - 1) * scale


# ----------------------------------------------------------------------------------------------------------------
# Heatmap of the chosen windows' density per (layer, head)


def density_grid(strategy: Strategy, cost: CostModel, heads: int, step: Optional[int] = None):
    """(layers, [L, H] density) of the chosen windows at `step`, or averaged over the strategy's steps."""
    steps = strategy.steps if step is None else [step]
    layers = strategy.layers
    out = np.zeros((len(layers), heads))
    for s in steps:
        for i, l in enumerate(layers):
            out[i] += [cost.density(w) for w in strategy.windows_for(s, l, heads)]
    return layers, out / max(1, len(steps))


def heatmap_image(values: np.ndarray, cell: Optional[int] = None) -> np.ndarray:
    """Rows = layers (top = first), columns = heads (left = first), colour = density in [0, 1] (dark = sparse),
    with a colour bar labelled 0, 0.5 and 1 on the right."""
    L, H = values.shape
    cell = cell or int(max(3, min(24, 720 // max(L, H, 1))))
    margin, bar_w = 10, 14
    w = margin + H * cell + 3 * margin + bar_w + 7 + text_width("0.5") + margin
    h = max(margin + L * cell + margin, 5 * 2 + 2 * margin + 60)
    img = np.full((h, w, 3), 255, np.uint8)
    cells = np.kron(colormap(values), np.ones((cell, cell, 1), np.uint8)) if L and H else np.zeros((0, 0, 3))
    img[margin:margin + L * cell, margin:margin + H * cell] = cells
    bx, bh = margin + H * cell + 3 * margin, h - 2 * margin
    ramp = colormap(np.linspace(1, 0, bh))[:, None, :]
    img[margin:margin + bh, bx:bx + bar_w] = ramp
    for value, label in ((1.0, "1"), (0.5, "0.5"), (0.0, "0")):
        y = margin + int(round((1 - value) * (bh - 1)))
        img[y, bx + bar_w:bx + bar_w + 3] = 0
        draw_text(img, bx + bar_w + 7, min(max(y - 5, 0), h - 10), label)
    return img


# ----------------------------------------------------------------------------------------------------------------
# Error vs sparsity


def error_plot_image(result: SearchResult, metric: str = "mse", budget: Optional[float] = None,
                     width: int = 640, height: int = 420) -> np.ndarray:
    """x: sparsity (0 .. 1, ticks every 0.25); y: log10 of the error (integer ticks). Faint dots: every
    (step, layer, head) error of a candidate; filled squares: the mean over them; dashed line: the budget."""
    err = result.error(metric)  # [N, C, H]
    sparsity = 1 - np.asarray(result.density, float)
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 56, 16, 14, 36
    pw, ph = width - left - right, height - top - bottom
    positive = err[err > 0]
    lo = np.floor(np.log10(positive.min())) if positive.size else -6.0
    hi = np.ceil(np.log10(positive.max())) if positive.size else 0.0
    if budget is not None and budget > 0:
        lo, hi = min(lo, np.floor(np.log10(budget))), max(hi, np.ceil(np.log10(budget)))
    hi = max(hi, lo + 1)

    def px(s):
        return left + np.clip(np.asarray(s) * (pw - 1), 0, pw - 1).astype(int)

    def py(e):
        le = np.log10(np.maximum(np.asarray(e, float), 10.0 ** lo))
        return top + np.clip((hi - le) / (hi - lo) * (ph - 1), 0, ph - 1).astype(int)

    for s in (0, 0.25, 0.5, 0.75, 1.0):  # x ticks
        x = int(px(s))
        img[top:top + ph, x] = 235
        img[top + ph:top + ph + 4, x] = 0
        label = f"{s:g}"
        draw_text(img, x - text_width(label) // 2, top + ph + 8, label)
    for d in range(int(lo), int(hi) + 1):  # y ticks
        y = int(py(10.0 ** d))
        img[y, left:left + pw] = 235
        img[y, left - 4:left] = 0
        draw_text(img, left - 8 - text_width(str(d)), y - 5, str(d))
    img[top:top + ph, left] = 0
    img[top + ph - 1, left:left + pw] = 0
    if budget is not None and budget > 0:
        y = int(py(budget))
        for x in range(left, left + pw, 8):
            img[y, x:x + 4] = (200, 30, 30)
    colors = colormap(np.linspace(0.05, 0.85, max(1, len(result.candidates))))
    for c in range(len(result.candidates)):
        e = err[:, c, :].ravel()
        same = [j for j in range(len(result.candidates)) if sparsity[j] == sparsity[c]]
        x = int(px(sparsity[c])) + int(round((same.index(c) - (len(same) - 1) / 2) * 14))  # side by side
        ys = py(e)
        faint = (255 - (255 - colors[c].astype(int)) * 0.35).astype(np.uint8)
        for y in np.unique(ys):
            img[y, max(x - 6, 0):x + 7] = faint
        if e.size:
            y = int(py(e.mean()))
            img[max(y - 4, 0):y + 5, max(x - 4, 0):x + 5] = colors[c]
    return img


# ----------------------------------------------------------------------------------------------------------------
# Text summary


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def summary(strategy: Strategy, result: SearchResult, *, metric: str = "mse", budget: Optional[float] = None,
            frames: Optional[FrameSearchResult] = None, frame_choice: Optional[dict] = None) -> str:
    """Per step: layers, mean sparsity of the chosen windows, expected attention speedup (dense FLOPs / sparse
    FLOPs summed over the step's layers, text included) and window usage; then per candidate: sparsity, mean and
    max error and how many heads chose it."""
    cost = result.cost_model()
    heads = result.heads
    grid = strategy.grid or result.grid
    rule = f"budget {budget:g}" if budget is not None else "argmin"
    lines = [f"tilewise calibration: {len(strategy.steps)} steps x {len(strategy.layers)} layers x {heads} heads, "
             f"grid {format_window(grid)} tiles (latent {format_window(result.geometry.latent)}, tile "
             f"{format_window(result.geometry.tile)}), metric {metric}, {rule}, skip_steps {strategy.skip_steps}",
             "", f"{'step':>5} {'layers':>6} {'sparsity':>9} {'speedup':>8}  windows (count)"]
    tot_dense = tot_sparse = 0.0
    tot_density, tot_heads = 0.0, 0
    usage_all = {}
    for s in strategy.steps:
        layers = sorted({k[1] for k in strategy.windows if k[0] == s})
        dense_f = sparse_f = dens = 0.0
        usage = {}
        for l in layers:
            ws = strategy.windows_for(s, l, heads)
            dense_f += cost.dense_flops
            sparse_f += cost.head_flops(ws)
            dens += sum(cost.density(w) for w in ws)
            for w in ws:
                name = "dense" if strategy.is_dense(w) else format_window(w)
                usage[name] = usage.get(name, 0) + 1
                usage_all[name] = usage_all.get(name, 0) + 1
        n = len(layers) * heads
        tot_dense, tot_sparse, tot_density, tot_heads = tot_dense + dense_f, tot_sparse + sparse_f, \
            tot_density + dens, tot_heads + n
        used = ", ".join(f"{k} {v}" for k, v in sorted(usage.items(), key=lambda kv: -kv[1]))
        lines.append(f"{s:>5} {len(layers):>6} {_pct(1 - dens / max(n, 1)):>9} "
                     f"{dense_f / max(sparse_f, 1e-300):>7.2f}x  {used}")
    if strategy.steps:
        lines.append(f"{'all':>5} {'':>6} {_pct(1 - tot_density / max(tot_heads, 1)):>9} "
                     f"{tot_dense / max(tot_sparse, 1e-300):>7.2f}x")
    lines.append("")
    lines.append("speedup = dense attention FLOPs / FLOPs of the chosen windows (tilewise.Plan.flops, text "
                 "included): the attention speedup to expect where the kernel runs at the same FLOP rate.")
    err = result.error(metric)
    chosen = result.choose(budget=budget, argmin=budget is None, metric=metric) if len(result.keys) else None
    lines += ["", f"{'candidate':>10} {'sparsity':>9} {'mean ' + metric:>13} {'max ' + metric:>12} {'chosen':>7}"]
    for c, w in enumerate(result.candidates):
        e = err[:, c, :]
        used = int(np.sum(chosen == c)) if chosen is not None else 0
        lines.append(f"{format_window(w):>10} {_pct(1 - result.density[c]):>9} "
                     f"{(e.mean() if e.size else float('nan')):>13.3e} {(e.max() if e.size else float('nan')):>12.3e} "
                     f"{used:>7}")
    dense_used = int(np.sum(chosen == -1)) if chosen is not None else 0
    lines.append(f"{'dense':>10} {_pct(0.0):>9} {0.0:>13.3e} {0.0:>12.3e} {dense_used:>7}")
    if frames is not None and frame_choice is not None:
        lines += ["", f"frame patterns (Efficient-vDiT attention tile, radius {frames.radius}, loss = mean over heads "
                      f"of {frames.metric}, steps >= {frames.skip_steps}):",
                  f"{'layer':>6} {'g':>3} {'loss':>11} {'sparsity':>9}"]
        for i, layer in enumerate(frames.layers):
            g = frame_choice[layer][0]
            j = frames.global_frames.index(g) if g in frames.global_frames else None
            loss = frames.loss[i, j] if j is not None else 0.0
            dens = frames.density[j] if j is not None else 1.0
            lines.append(f"{layer:>6} {g:>3} {loss:>11.3e} {_pct(1 - dens):>9}")
    return "\n".join(lines) + "\n"


def write_report(directory, strategy: Strategy, result: SearchResult, *, metric: str = "mse",
                 budget: Optional[float] = None, frames: Optional[FrameSearchResult] = None,
                 frame_choice: Optional[dict] = None) -> list:
    """summary.txt, heatmap_all.png (density averaged over steps), heatmap_step<N>.png per step,
    error_vs_sparsity.png and search.npz (the errors, to re-select with SearchResult.load(...).select(...)).
    Returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    text = summary(strategy, result, metric=metric, budget=budget, frames=frames, frame_choice=frame_choice)
    text += ("\nheatmap_all.png, heatmap_step<N>.png: density of the chosen window per layer (rows, first at the "
             "top) and head (columns, first at the left), averaged over steps or at step N; dark = sparse, colour "
             "bar 0..1.\nerror_vs_sparsity.png: x = sparsity (0..1), y = log10 of the " + metric + " per "
             "(step, layer, head) (faint ticks) and its mean per candidate (squares; colours dark to light in the "
             "candidate table's order; candidates of equal sparsity side by side); dashed line = budget.\n")
    (directory / "summary.txt").write_text(text)
    written.append(directory / "summary.txt")
    cost = result.cost_model()
    for step in [None, *strategy.steps]:
        _, values = density_grid(strategy, cost, result.heads, step)
        path = directory / ("heatmap_all.png" if step is None else f"heatmap_step{step}.png")
        write_png(path, heatmap_image(values))
        written.append(path)
    path = directory / "error_vs_sparsity.png"
    write_png(path, error_plot_image(result, metric, budget))
    written.append(path)
    result.save(directory / "search.npz")
    written.append(directory / "search.npz")
    return written
