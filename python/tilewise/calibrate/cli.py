"""`tilewise calibrate`: search windows (and frame patterns) on captures, write the strategy and a report.

    tilewise calibrate --captures DIR --candidates 1x3x3,3x3x3,3x5x5 --budget 1e-3 --skip-steps 10 \\
                       --out strategy.json [--fastvideo-out mask_strategy.json] [--report-dir DIR]

Everything the command line says is checked before the search starts (arguments, output paths, captures,
candidates against every requested output format), and the search's errors are written as soon as the search
ends, before anything that could still fail: a finished search is never lost (re-select with --errors).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from tilewise.calibrate import report
from tilewise.calibrate.capture import check_finite, load_captures
from tilewise.calibrate.search import FP8_COST, METRICS, SearchResult, canonical_window, parse_windows, search, \
    search_frame_patterns
from tilewise.calibrate.strategy import AXES, Strategy, format_window


from tilewise._cli_common import Parser as _Parser
from tilewise._cli_common import UsageError, main_reporting_errors


def _progress(stream, enabled: bool, desc: str):
    """A progress(done, total, label) callback drawing a tqdm bar (elapsed time and estimate included), or None.
    tqdm comes with the `calibrate` extra (and with diffusers); without it the run is silent."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = None

    def update(done: int, total: int, label: str = "") -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, file=stream, unit="call", dynamic_ncols=True, mininterval=0.5)
        bar.set_postfix_str(label, refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _number(text: str, name: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not x >= 0:
        raise UsageError(f"invalid {name} = {text}: expected a number >= 0")
    return x


def _count(text: Optional[str], name: str, least: int = 0) -> Optional[int]:
    if text is None:
        return None
    try:
        x = int(text.strip())
    except ValueError:
        x = least - 1
    if x < least:
        raise UsageError(f"invalid {name} = {text}: expected an integer >= {least}")
    return x


def _ints(text: str, name: str) -> list:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        out = [-1]
    if min(out) < 0:
        raise UsageError(f"invalid {name} = {text}: expected comma-separated integers >= 0")
    return out


def _writable_file(path: str, name: str) -> None:
    """The file can be created or replaced: its directory exists and is writable, and it is not a directory."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"invalid {name} = {path}: a directory: expected a file to write")
    if not parent.is_dir():
        raise UsageError(f"invalid {name} = {path}: {'not a directory' if parent.exists() else 'no such directory'}"
                         f": {parent}: expected a file in an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"invalid {name} = {path}: not writable: expected a file this user can write")


def _writable_dir(path: str, name: str) -> None:
    """The directory exists and is writable, or can be created (its nearest existing ancestor is a writable
    directory)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"invalid {name} = {path}: a file: expected a directory (created when missing)")
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"invalid {name} = {path}: {ancestor} is a file: expected a directory (created when "
                         "missing)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"invalid {name} = {path}: {ancestor} is not writable: expected a directory this user "
                         "can write")


def _fastvideo_problem(window, grid) -> Optional[str]:
    """Why FastVideo's mask_strategy cannot hold the (clamped) window, or None: FastVideo centres an even window
    (k + 1 tiles) where tilewise's covers k, so they agree on an even window only when it spans the axis."""
    for k, n, axis in zip(canonical_window(window, grid), grid, AXES):
        if k % 2 == 0 and k < n:
            return (f"even window {k} along {axis} is smaller than the grid ({n} tiles), and FastVideo's "
                    f"mask_strategy (--fastvideo-out) centres even windows ({k + 1} tiles) where tilewise takes "
                    f"{k}: use {k + 1} (or {k - 1}), or leave out --fastvideo-out")
    return None


def build_parser() -> argparse.ArgumentParser:
    from tilewise._version import __version__

    p = _Parser(prog="tilewise calibrate", description=(
        "Choose an STA window per (denoising step, layer, head) from captured q/k/v: the cheapest candidate "
        "whose error against dense attention is within --budget, or the lowest-error candidate (--argmin). "
        "Optionally also Efficient-vDiT's global frames per layer (--frame-threshold). See docs/calibration.md."))
    p.add_argument("--version", action="version", version=f"tilewise {__version__}")
    src = p.add_argument_group("input")
    src.add_argument("--captures", metavar="DIR", help="capture directory (tilewise.calibrate.save_capture)")
    src.add_argument("--errors", metavar="FILE",
                     help="the errors file of an earlier search (search.npz in its --report-dir, or "
                          "<out>.search.npz): re-select without recomputing")
    sel = p.add_argument_group("window search")
    sel.add_argument("--candidates", metavar="LIST", help="candidate windows in tiles, e.g. 1x3x3,3x3x3,3x5x5")
    mode = sel.add_mutually_exclusive_group()
    mode.add_argument("--budget", metavar="X", help="largest accepted error per head (in --metric units)")
    mode.add_argument("--argmin", action="store_true", help="lowest-error candidate per head (never dense)")
    sel.add_argument("--metric", choices=METRICS,
                     help="mse (default), l1 or rel_mse (mse / mean square of the dense output, per head); with "
                          "--errors, default the metric the search was made with")
    sel.add_argument("--skip-steps", metavar="N",
                     help="the first N steps stay dense (default 0, or the --errors file's)")
    sel.add_argument("--num-steps", metavar="N", help="steps of the sampler (with --fill previous)")
    sel.add_argument("--fill", choices=("dense", "previous"), default="dense",
                     help="uncaptured steps below --num-steps: dense (default) or the previous captured step's "
                          "windows")
    sel.add_argument("--fp8", action="store_true",
                     help="also evaluate every candidate in FP8 (docs/semantics.md §11; CPU and Hopper): the "
                          "budget then picks the cheapest (window, precision) per head")
    sel.add_argument("--fp8-cost", metavar="X",
                     help=f"an FP8 candidate's cost relative to the same window in bf16 (default {FP8_COST})")
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
                     help="search.npz (the errors), summary.txt, heatmaps and error_vs_sparsity.png (plots need "
                          "matplotlib: pip install 'tilewise[calibrate]')")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _errors_path(args) -> Path:
    """Where a new search's errors go: the report directory, else next to --out."""
    if args.report_dir:
        return Path(args.report_dir) / "search.npz"
    out = Path(args.out)
    return out.with_name(out.stem + ".search.npz")


def run(argv: Sequence[str], stdout=None, stderr=None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(list(argv))

    # 1. The arguments themselves.
    if (args.captures is None) == (args.errors is None):
        raise UsageError("give exactly one of --captures DIR and --errors FILE")
    skip = _count(args.skip_steps, "--skip-steps")
    num_steps = _count(args.num_steps, "--num-steps", least=1)
    budget = _number(args.budget, "--budget") if args.budget is not None else None
    want_windows = args.candidates is not None or args.errors is not None
    if not want_windows and args.frame_threshold is None:
        raise UsageError("nothing to search: give --candidates (with --budget or --argmin) and/or "
                         "--frame-threshold")
    if want_windows and budget is None and not args.argmin:
        raise UsageError("give --budget X (cheapest window within X) or --argmin (lowest-error window)")
    if args.errors is not None and args.candidates is not None:
        raise UsageError(f"invalid --candidates = {args.candidates}: --errors {args.errors} re-selects among the "
                         "candidates that search evaluated; run a new search with --captures to try others")
    if args.frame_threshold is not None and args.captures is None:
        raise UsageError("--frame-threshold needs --captures")
    frame_threshold = _number(args.frame_threshold, "--frame-threshold") if args.frame_threshold is not None else None
    frame_radius = _count(args.frame_radius, "--frame-radius")
    frame_candidates = _ints(args.frame_candidates, "--frame-candidates") if args.frame_candidates else None
    if args.fastvideo_out and not want_windows:
        raise UsageError("--fastvideo-out needs a window search (--candidates with --budget or --argmin)")
    if args.fp8 and args.candidates is None:
        raise UsageError("--fp8 evaluates the --candidates in FP8 too: give --candidates (with --captures)")
    fp8_cost = _number(args.fp8_cost, "--fp8-cost") if args.fp8_cost is not None else FP8_COST
    if not 0 < fp8_cost <= 1:
        raise UsageError(f"invalid --fp8-cost = {args.fp8_cost}: expected a number in (0, 1]")
    candidates = None
    if args.candidates is not None:
        if not args.candidates.strip():
            raise UsageError("invalid --candidates = (empty): expected windows KTxKHxKW, comma-separated (e.g. "
                             "1x3x3,3x3x3)")
        try:
            candidates = parse_windows(args.candidates)
        except ValueError as e:
            raise UsageError(f"invalid --candidates = {args.candidates}: {e}") from None

    # 2. Every output can be written.
    _writable_file(args.out, "--out")
    if args.fastvideo_out:
        _writable_file(args.fastvideo_out, "--fastvideo-out")
    if args.report_dir:
        _writable_dir(args.report_dir, "--report-dir")
    if args.captures is not None and candidates is not None and not args.report_dir:
        _writable_file(str(_errors_path(args)), "--out (its errors file)")
    if args.report_dir and not report.have_matplotlib():
        stderr.write("tilewise: warning: matplotlib is not installed, so --report-dir gets the summary and the "
                     "errors but no plots (pip install 'tilewise[calibrate]')\n")

    # 3. The inputs: captures (every manifest, array shape and value) or the errors file.
    result = captures = None
    if args.errors is not None:
        result = SearchResult.load(args.errors)
        if result.skip_steps > (skip if skip is not None else result.skip_steps):
            raise UsageError(f"invalid --skip-steps = {skip}: {args.errors} did not evaluate steps < "
                             f"{result.skip_steps}")
        bad = result.non_finite()
        if bad:
            raise UsageError(f"invalid --errors file {args.errors}: the errors of (step, layer) "
                             f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} are NaN or Inf: "
                             "expected finite errors (search again on finite captures)")
        skip = result.skip_steps if skip is None else skip
    else:
        captures = load_captures(args.captures)
        check_finite(captures, progress=_progress(stderr, not args.quiet, "check captures"))
    skip = skip or 0
    metric = args.metric or (result.metric if result is not None else None) or "mse"
    grid = result.grid if result is not None else captures[0].geometry.grid
    windows = candidates if candidates is not None else (result.candidates if result is not None else [])
    if args.fastvideo_out:
        for w in windows:
            problem = _fastvideo_problem(w, grid)
            if problem:
                source = "--candidates" if candidates is not None else f"the candidates of {args.errors}"
                raise UsageError(f"invalid candidate {format_window(w)} in {source}: on the grid "
                                 f"{format_window(grid)} its {problem}")

    # 4. The search; its errors are written at once.
    written = []
    if result is None and candidates:
        result = search(captures, candidates, precisions=("native", "fp8") if args.fp8 else ("native",),
                        skip_steps=skip, source=str(args.captures),
                        progress=_progress(stderr, not args.quiet, "calibrate"))
        result.metric = metric
        errors_file = _errors_path(args)
        errors_file.parent.mkdir(parents=True, exist_ok=True)
        result.save(errors_file)
        written.append(errors_file)
        bad = result.non_finite()
        if bad:
            raise UsageError(f"the errors of (step, layer) {', '.join(map(str, bad[:5]))} are NaN or Inf (saved in "
                             f"{errors_file}): no strategy is written from them")
    frames = frame_choice = None
    if frame_threshold is not None:
        frames = search_frame_patterns(captures, global_frames=frame_candidates, radius=frame_radius,
                                       skip_steps=skip, metric=args.frame_metric,
                                       progress=_progress(stderr, not args.quiet, "frames"))
        frame_choice = frames.select(frame_threshold)

    # 5. The strategy, rendered in every format before any is written.
    if result is not None:
        strategy = result.select(budget=budget, argmin=args.argmin, metric=metric, skip_steps=skip,
                                 num_steps=num_steps, fill=args.fill, fp8_cost=fp8_cost)
    else:
        g = captures[0].geometry
        strategy = Strategy(latent=g.latent, tile=g.tile, skip_steps=skip)
    if frames is not None:
        strategy.frame_patterns = dict(frame_choice)
        strategy.search["frames"] = {"threshold": frame_threshold, "metric": frames.metric,
                                     "radius": frame_radius, "global_frames": frames.global_frames}
    if args.fastvideo_out:
        strategy.to_fastvideo(num_steps=num_steps)  # raises (naming the key) before any file is written
    strategy.save(args.out)
    written.append(Path(args.out))
    if args.fastvideo_out:
        strategy.save_fastvideo(args.fastvideo_out, num_steps=num_steps)
        written.append(Path(args.fastvideo_out))
    if result is not None:
        text = report.summary(strategy, result, metric=metric, budget=budget, frames=frames,
                              frame_choice=frame_choice)
    else:
        text = "".join(f"layer {l}: global_frames {g}, radius {r}\n" for l, (g, r) in sorted(frame_choice.items()))
    stdout.write(text)
    if args.report_dir:
        if result is not None:
            # a new search's errors are already in the report directory; a re-selection copies its input there
            save_errors = args.errors is not None and Path(args.errors).resolve() != \
                (Path(args.report_dir) / "search.npz").resolve()
            written += report.write_report(args.report_dir, strategy, result, metric=metric, budget=budget,
                                           frames=frames, frame_choice=frame_choice, save_errors=save_errors,
                                           progress=_progress(stderr, not args.quiet, "report"))
        else:
            Path(args.report_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.report_dir) / "summary.txt").write_text(text)
            written.append(Path(args.report_dir) / "summary.txt")
    stdout.write("\nwrote " + ", ".join(str(w) for w in dict.fromkeys(written)) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_reporting_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())
