"""Calibration report: a text summary (sparsity and expected attention speedup per step), heatmaps of the chosen
windows' density per (layer, head), and a plot of error vs sparsity per candidate.

The plots use matplotlib (the optional `calibrate` extra: pip install 'tilewise[calibrate]'); without it the
report has the summary and the errors file, and says that the plots were left out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from tilewise.calibrate.search import FP8_COST, CostModel, FrameSearchResult, SearchResult
from tilewise.calibrate.strategy import Strategy, format_window


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    # A bare Figure (no pyplot): no global state and no GUI backend, whatever the user's matplotlib settings.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _ticks(n: int, most: int = 24) -> np.ndarray:
    """Tick positions 0 .. n-1, thinned to at most `most` labels."""
    return np.arange(0, n, max(1, -(-n // most)))


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


def heatmap_figure(values: np.ndarray, layers, title: str):
    """Rows = layers (first at the top), columns = heads, colour = density of the chosen window (0 = all keys
    dropped, 1 = dense), with the layer and head indices on the axes and a labelled colour bar."""
    L, H = values.shape
    fig = _figure(min(16.0, 2.5 + 0.35 * H), min(16.0, 1.8 + 0.3 * L))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(_ticks(H), [str(h) for h in _ticks(H)])
    ax.set_yticks(_ticks(L), [str(layers[i]) for i in _ticks(L)])
    fig.colorbar(image, ax=ax, label="density of the chosen window (1 = dense)")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Error vs sparsity


def error_figure(result: SearchResult, metric: str = "mse", budget: Optional[float] = None):
    """x: sparsity of each candidate; y: its error per (step, layer, head) (small dots) and their mean (large
    marker), log scale; one legend entry per candidate, and the budget as a dashed line."""
    err = result.error(metric)  # [N, C, H]
    sparsity = 1 - np.asarray(result.density, float)
    fig = _figure(7.0, 4.5)
    ax = fig.subplots()
    colors = [f"C{c % 10}" for c in range(len(result.candidates))]
    floor = None
    positive = err[err > 0]
    if positive.size:
        floor = positive.min() / 10  # errors of exactly 0 (dense candidates) drawn at the bottom of a log axis
    for c, w in enumerate(result.candidates):
        e = err[:, c, :].ravel()
        shown = np.maximum(e, floor) if floor else e
        x = np.full(shown.shape, sparsity[c])
        ax.scatter(x, shown, s=6, alpha=0.3, color=colors[c], linewidths=0)
        label = f"{result.label(c)} (mean {e.mean():.2e})" if e.size else result.label(c)
        ax.scatter([sparsity[c]], [shown.mean()] if e.size else [], s=60, marker="s", color=colors[c],
                   edgecolors="black", label=label)
    if budget is not None and budget > 0 and np.isfinite(budget):
        ax.axhline(budget, color="red", linestyle="--", label=f"budget {budget:g}")
    if floor:
        ax.set_yscale("log")
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("sparsity of the candidate (fraction of video-video pairs skipped)")
    ax.set_ylabel(f"{metric} against dense attention")
    ax.set_title(f"Error vs sparsity: {len(result.keys)} (step, layer) x {result.heads} heads "
                 "(dots; squares: mean)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="candidate window", fontsize="small", loc="best")
    return fig


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
    if strategy.fp8:
        lines.append(f"FP8 (docs/semantics.md §11): {len(strategy.fp8)} of {len(strategy.windows)} (step, layer, "
                     "head) chose it; a (step, layer) runs FP8 when all its heads did.")
    err = result.error(metric)
    fp8_cost = strategy.search.get("fp8_cost", FP8_COST)
    chosen = result.choose(budget=budget, argmin=budget is None, metric=metric, fp8_cost=fp8_cost) \
        if len(result.keys) else None
    lines += ["", f"{'candidate':>14} {'sparsity':>9} {'mean ' + metric:>13} {'max ' + metric:>12} {'chosen':>7}"]
    for c, w in enumerate(result.candidates):
        e = err[:, c, :]
        used = int(np.sum(chosen == c)) if chosen is not None else 0
        lines.append(f"{result.label(c):>14} {_pct(1 - result.density[c]):>9} "
                     f"{(e.mean() if e.size else float('nan')):>13.3e} {(e.max() if e.size else float('nan')):>12.3e} "
                     f"{used:>7}")
    dense_used = int(np.sum(chosen == -1)) if chosen is not None else 0
    lines.append(f"{'dense':>14} {_pct(0.0):>9} {0.0:>13.3e} {0.0:>12.3e} {dense_used:>7}")
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
                 frame_choice: Optional[dict] = None, save_errors: bool = True, progress=None) -> list:
    """summary.txt, heatmap_all.png (density averaged over steps), heatmap_step<N>.png per step,
    error_vs_sparsity.png (the plots only with matplotlib installed) and, with save_errors, search.npz (the
    errors, to re-select with SearchResult.load(...).select(...) or `tilewise calibrate --errors`). Returns the
    paths written. progress(done, total, label) after each plot."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if save_errors:  # first: the search is the expensive part
        result.save(directory / "search.npz")
        written.append(directory / "search.npz")
    text = summary(strategy, result, metric=metric, budget=budget, frames=frames, frame_choice=frame_choice)
    plots = have_matplotlib()
    if not plots:
        text += ("\nNo plots: matplotlib is not installed (pip install 'tilewise[calibrate]').\n")
    (directory / "summary.txt").write_text(text)
    written.append(directory / "summary.txt")
    if not plots:
        return written
    cost = result.cost_model()
    steps = [None, *strategy.steps]
    for n, step in enumerate(steps):
        layers, values = density_grid(strategy, cost, result.heads, step)
        when = "averaged over steps" if step is None else f"at step {step}"
        fig = heatmap_figure(values, layers, f"Density of the chosen windows {when}")
        path = directory / ("heatmap_all.png" if step is None else f"heatmap_step{step}.png")
        fig.savefig(path, dpi=100)
        written.append(path)
        if progress:
            progress(n + 1, len(steps) + 1, path.name)
    path = directory / "error_vs_sparsity.png"
    error_figure(result, metric, budget).savefig(path, dpi=100)
    written.append(path)
    if progress:
        progress(len(steps) + 1, len(steps) + 1, path.name)
    return written
