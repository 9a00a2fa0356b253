"""Window calibration for Sliding Tile Attention (and frame-pattern search for Efficient-vDiT's attention tile).

    import tilewise.calibrate as cal

    geometry = cal.Geometry(latent=(30, 48, 80), tile=(6, 8, 8), text_len=226)
    cal.save_capture("caps", step=12, layer=3, q=q, k=k, v=v, geometry=geometry)
    result = cal.search(cal.load_captures("caps"), [(3, 3, 3), (3, 5, 5), (1, 6, 10)], skip_steps=10)
    strategy = result.select(budget=1e-3)            # or argmin=True
    strategy.save("strategy.json")                   # tilewise format; strategy.save_fastvideo(...) for FastVideo
    windows = strategy.windows_for(step, layer, num_heads)

On a diffusers pipeline, capture() measures the errors live during a real (dense) generation, with nothing
written to disk:

    with cal.capture(pipe, steps=range(10, 50), candidates=[(3, 3, 3), (1, 6, 10)], skip_steps=10) as cap:
        pipe(prompt, num_inference_steps=50)
    cap.result().select(budget=1e-3, metric="rel_mse").save("strategy.json")

`cal.evaluate(q, k, v, geometry, candidates)` returns the per-head errors of one call. The command line is
`tilewise calibrate` (or `python -m tilewise.calibrate`). See docs/calibration.md.

Note: `tilewise.calibrate.capture` is the capture() function; the capture file format lives in the submodule of
the same name, which `from tilewise.calibrate.capture import ...` still reaches.
"""
from tilewise.calibrate.capture import Capture, Geometry, load_captures, save_capture
from tilewise.calibrate.search import (
    FP8_COST,
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
from tilewise.calibrate.live import LiveCapture, capture  # after the submodule `capture`: the name is the function

__all__ = ["FP8_COST", "Capture", "CostModel", "Evaluation", "FrameSearchResult", "Geometry", "LiveCapture",
           "SearchResult", "Strategy", "canonical_window", "capture", "evaluate", "evaluate_frames", "load_captures",
           "parse_windows", "save_capture", "search", "search_frame_patterns"]
