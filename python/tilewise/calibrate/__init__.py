"""Window calibration for Sliding Tile Attention (and frame-pattern search for Efficient-vDiT's attention tile).

    import tilewise.calibrate as cal

    geometry = cal.Geometry(latent=(30, 48, 80), tile=(6, 8, 8), text_len=226)
    cal.save_capture("caps", step=12, layer=3, q=q, k=k, v=v, geometry=geometry)
    result = cal.search(cal.load_captures("caps"), [(3, 3, 3), (3, 5, 5), (1, 6, 10)], skip_steps=10)
    strategy = result.select(budget=1e-3)            # or argmin=True
    strategy.save("strategy.json")                   # tilewise format; strategy.save_fastvideo(...) for FastVideo
    windows = strategy.windows_for(step, layer, num_heads)

A live hook can skip the disk: `cal.evaluate(q, k, v, geometry, candidates)` returns per-head errors of one call.
The command line is `tilewise calibrate` (or `python -m tilewise.calibrate`). See docs/calibration.md.
"""
from tilewise.calibrate.capture import Capture, Geometry, load_captures, save_capture
from tilewise.calibrate.search import (
    CostModel,
    Evaluation,
    FrameSearchResult,
    SearchResult,
    canonical_window,
    evaluate,
    evaluate_frames,
    parse_windows,
    search,
    search_frame_patterns,
)
from tilewise.calibrate.strategy import Strategy

__all__ = ["Capture", "CostModel", "Evaluation", "FrameSearchResult", "Geometry", "SearchResult", "Strategy",
           "canonical_window", "evaluate", "evaluate_frames", "load_captures", "parse_windows", "save_capture",
           "search", "search_frame_patterns"]
