"""`tilewise calibrate`: search windows (and frame patterns) on captures, write the strategy and a report.

    tilewise calibrate --captures DIR --candidates 1x3x3,3x3x3,3x5x5 --budget 1e-3 --skip-steps 10 \
                       --out strategy.json [--fastvideo-out mask_strategy.json] [--report-dir DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from tilewise.calibrate import report
from tilewise.calibrate.capture import load_captures
from tilewise.calibrate.search import METRICS, SearchResult, parse_windows, search, search_frame_patterns


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the C++ CLI
        raise UsageError(message)


class ProgressBar:
    """Plain-text progress on stderr: redrawn in place on a terminal, a line every 10% otherwise."""

    def __init__(self, stream=None, enabled: bool = True, width: int = 30):
        self.stream = stream or sys.stderr
        self.enabled, self.width = enabled, width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.last_decile = -1
        self.prefix = "calibrate"

    def __call__(self, done: int, total: int, label: str = "") -> None:
        if not self.enabled or total <= 0:
            return
        frac = done / total
        elapsed = time.monotonic() - self.start
        left = elapsed / frac - elapsed if frac > 0 else 0.0
        filled = int(round(frac * self.width))
        line = (f"{self.prefix} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {label:<24} "
                f"{int(elapsed) // 60}:{int(elapsed) % 60:02d} elapsed, {int(left) // 60}:{int(left) % 60:02d} left")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self.last_decile or done >= total:
                self.last_decile = decile
                self.stream.write(line.rstrip() + "\n")
                self.stream.flush()


def _number(text: str, name: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not x >= 0:
        raise UsageError(f"invalid {name} = {text}: expected a number >= 0")
    return x


def _ints(text: str, name: str) -> list:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        out = [-1]
    if min(out) < 0:
        raise UsageError(f"invalid {name} = {text}: expected comma-separated integers >= 0")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tilewise calibrate", description=(
        "Choose an STA window per (denoising step, layer, head) from captured q/k/v: the cheapest candidate "
        "whose error against dense attention is within --budget, or the lowest-error candidate (--argmin). "
        "Optionally also Efficient-vDiT's global frames per layer (--frame-threshold). See docs/calibration.md."))
    src = p.add_argument_group("input")
    src.add_argument("--captures", metavar="DIR", help="capture directory (tilewise.calibrate.save_capture)")
    src.add_argument("--errors", metavar="FILE",
                     help="search.npz of an earlier run (in its --report-dir): re-select without recomputing")
    sel = p.add_argument_group("window search")
    sel.add_argument("--candidates", metavar="LIST", help="candidate windows in tiles, e.g. 1x3x3,3x3x3,3x5x5")
    mode = sel.add_mutually_exclusive_group()
    mode.add_argument("--budget", metavar="X", help="largest accepted error per head (in --metric units)")
    mode.add_argument("--argmin", action="store_true", help="lowest-error candidate per head (never dense)")
    sel.add_argument("--metric", default="mse", choices=METRICS,
                     help="mse (default), l1 or rel_mse (mse / mean square of the dense output, per head)")
    sel.add_argument("--skip-steps", metavar="N",
                     help="the first N steps stay dense (default 0, or the --errors file's)")
    sel.add_argument("--num-steps", metavar="N", help="steps of the sampler (with --fill previous)")
    sel.add_argument("--fill", choices=("dense", "previous"), default="dense",
                     help="uncaptured steps below --num-steps: dense (default) or the previous captured step's "
                          "windows")
    fr = p.add_argument_group("frame pattern search (Efficient-vDiT attention tile)")
    fr.add_argument("--frame-threshold", metavar="R",
                    help="per layer, the smallest global frame count whose loss is <= R")
    fr.add_argument("--frame-candidates", metavar="LIST", help="global frame counts to try (default 0..T)")
    fr.add_argument("--frame-radius", metavar="N", default="0", help="local radius of the pattern (default 0)")
    fr.add_argument("--frame-metric", default="rel_mse", choices=METRICS,
                    help="per-head loss averaged over heads (default rel_mse)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="FILE", required=True, help="strategy JSON (tilewise format)")
    out.add_argument("--fastvideo-out", metavar="FILE", help="also write FastVideo's mask_strategy format")
    out.add_argument("--report-dir", metavar="DIR",
                     help="summary.txt, heatmaps, error_vs_sparsity.png and search.npz")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(argv: Sequence[str], stdout=None, stderr=None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(list(argv))
    if (args.captures is None) == (args.errors is None):
        raise UsageError("give exactly one of --captures DIR and --errors FILE")
    skip = None
    if args.skip_steps is not None:
        skip = int(_number(args.skip_steps, "--skip-steps"))
        if args.skip_steps.strip() != str(skip):
            raise UsageError(f"invalid --skip-steps = {args.skip_steps}: expected an integer >= 0")
    num_steps = int(_number(args.num_steps, "--num-steps")) if args.num_steps is not None else None
    budget = _number(args.budget, "--budget") if args.budget is not None else None
    want_windows = args.candidates is not None or args.errors is not None
    if not want_windows and args.frame_threshold is None:
        raise UsageError("nothing to search: give --candidates (with --budget or --argmin) and/or "
                         "--frame-threshold")
    if want_windows and budget is None and not args.argmin:
        raise UsageError("give --budget X (cheapest window within X) or --argmin (lowest-error window)")
    if args.frame_threshold is not None and args.captures is None:
        raise UsageError("--frame-threshold needs --captures")
    frame_threshold = _number(args.frame_threshold, "--frame-threshold") if args.frame_threshold else None
    frame_radius = int(_number(args.frame_radius, "--frame-radius"))
    frame_candidates = _ints(args.frame_candidates, "--frame-candidates") if args.frame_candidates else None
    if args.fastvideo_out and not want_windows:
        raise UsageError("--fastvideo-out needs a window search (--candidates with --budget or --argmin)")
    try:
        candidates = parse_windows(args.candidates) if args.candidates else None
    except ValueError as e:
        raise UsageError(f"invalid --candidates = {args.candidates}: {e}") from None

    bar = ProgressBar(stderr, enabled=not args.quiet)
    captures = load_captures(args.captures) if args.captures else None
    result = None
    if args.errors:
        result = SearchResult.load(args.errors)
        skip = result.skip_steps if skip is None else skip
        if result.skip_steps > skip:
            raise UsageError(f"invalid --skip-steps = {skip}: {args.errors} did not evaluate steps < "
                             f"{result.skip_steps}")
    skip = skip or 0
    if result is None and candidates:
        result = search(captures, candidates, skip_steps=skip, progress=bar, source=str(args.captures))
    frames = frame_choice = None
    if frame_threshold is not None:
        bar.prefix, bar.start, bar.last_decile = "frames", time.monotonic(), -1
        frames = search_frame_patterns(captures, global_frames=frame_candidates, radius=frame_radius,
                                       skip_steps=skip, metric=args.frame_metric, progress=bar)
        frame_choice = frames.select(frame_threshold)

    if result is not None:
        strategy = result.select(budget=budget, argmin=args.argmin, metric=args.metric, skip_steps=skip,
                                 num_steps=num_steps, fill=args.fill)
    else:
        from tilewise.calibrate.strategy import Strategy
        g = captures[0].geometry
        strategy = Strategy(latent=g.latent, tile=g.tile, skip_steps=skip)
    if frames is not None:
        strategy.frame_patterns = dict(frame_choice)
        strategy.search["frames"] = {"threshold": frame_threshold, "metric": frames.metric,
                                     "radius": frame_radius, "global_frames": frames.global_frames}
    strategy.save(args.out)
    written = [args.out]
    if args.fastvideo_out:
        strategy.save_fastvideo(args.fastvideo_out, num_steps=num_steps)
        written.append(args.fastvideo_out)
    if result is not None:
        text = report.summary(strategy, result, metric=args.metric, budget=budget, frames=frames,
                              frame_choice=frame_choice)
    else:
        text = "".join(f"layer {l}: global_frames {g}, radius {r}\n" for l, (g, r) in sorted(frame_choice.items()))
    stdout.write(text)
    if args.report_dir:
        if result is not None:
            written += [str(p) for p in report.write_report(args.report_dir, strategy, result, metric=args.metric,
                                                            budget=budget, frames=frames,
                                                            frame_choice=frame_choice)]
        else:
            from pathlib import Path
            Path(args.report_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.report_dir) / "summary.txt").write_text(text)
            written.append(str(Path(args.report_dir) / "summary.txt"))
    stdout.write("\nwrote " + ", ".join(str(w) for w in written) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except UsageError as e:
        print(f"tilewise: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"tilewise: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
