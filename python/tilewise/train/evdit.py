"""Efficient-vDiT's three-stage pipeline: few-step generation, then the attention tile, then both together.

1. "mlcd", multi-step latent consistency distillation: the teacher's N-step Euler trajectory is split into
   `segments`; at a random teacher step n the student's consistency function f(x_n, s_n) = x_n + (b - s_n)
   v(x_n, s_n), which jumps to its segment's lower boundary b, is pulled towards the EMA student's f at the point
   one teacher Euler step further (x_n + (s_{n+1} - s_n) v_teacher(x_n)); at the boundary the target is that
   point itself. The result samples in `student_steps` steps (one consistency jump per segment when equal).
2. "search", layer-wise attention-tile search on the dense few-step model: its q, k, v are captured during
   few-step sampling and tilewise.calibrate.search_frame_patterns gives each layer's loss (rel_mse of the
   attention output against dense) for every number of global frames; each layer takes the fewest global
   frames whose loss stays under the threshold (the paper's r). Writes search.json (a tilewise strategy).
3. "kd", knowledge distillation: the sparse few-step student (the stage-1 model with the searched attention
   tile) learns the dense few-step model's predictions (final output, plus attention outputs) at the few-step
   noise levels.

Each stage runs alone when the earlier ones' files are in the output folder (mlcd.safetensors, search.json) or
given (--strategy for kd); a stage alone without them starts from the base model (logged)."""
from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import tilewise.diffusers as twd
from tilewise.calibrate import Capture, search_frame_patterns
from tilewise.calibrate.strategy import Strategy
from tilewise.train import common, flow, models
from tilewise.train.loop import Run, unwrap

STAGES = ("mlcd", "search", "kd")


def _few_step(p) -> torch.Tensor:
    return flow.student_sigmas(p.teacher_steps, p.segments, p.student_steps, p.shift)


def mlcd(run: Run, base, teacher, ds):
    """Stage 1 (student initialised from base, fp32; teacher its frozen copy). Returns the dense few-step model."""
    p = run.preset
    sig, bounds = flow.segment_sigmas(p.teacher_steps, p.segments, p.shift)
    sig = sig.to(run.device)
    seg_end = torch.tensor([next(b for b in bounds if b > n) for n in range(p.teacher_steps)], device=run.device)
    student = common.student(base, run, lora_rank=p.lora_rank)
    params = common.trainable(student)
    ema = {k: v.detach().clone() for k, v in params.items()}
    g = run.generator(3)
    module = unwrap(student)  # the EMA target's forward: the student's module with the EMA weights swapped in

    def f(model, x, s, boundary, batch):
        return flow.consistency(models.call(model, x, s, batch).to(run.dtype), x, s, boundary)

    def loss_fn(step, batch):
        x0 = batch["latents"]
        B = x0.shape[0]
        noise = run.batch_randn(g, x0.shape)
        n = run.batch_randint(g, p.teacher_steps, (B,))
        s_n, s_next, end = sig[n], sig[n + 1], seg_end[n]
        boundary = sig[end]
        x_n = flow.noised(x0, noise, s_n)
        with torch.no_grad(), run.autocast():
            v_t = models.call(teacher, x_n, s_n, batch).to(run.dtype)
            x_next = x_n + (s_next - s_n).view(-1, 1, 1, 1, 1) * v_t
            with _swapped(params, ema):  # the EMA student: the same module with the EMA weights in place
                target = f(module, x_next, s_next, boundary, batch)
            at_boundary = (n + 1 == end).view(-1, 1, 1, 1, 1)
            target = torch.where(at_boundary, x_next, target)
        with run.autocast():
            pred = f(student, x_n, s_n, boundary, batch)
        return F.mse_loss(pred, target)

    @torch.no_grad()
    def update_ema(step):
        for k, v in params.items():
            ema[k].lerp_(v.detach(), 1 - p.ema)

    run.train("mlcd", steps=p.mlcd_steps, params=params, loss_fn=loss_fn, data=common.batch_source(run, ds, 3),
              extra={f"ema/{k}": v for k, v in ema.items()}, after_step=update_ema, lr=p.distill_lr)
    run.save_model("mlcd", student, {"stage": "mlcd", "lora_rank": p.lora_rank})
    return common.finished(run, "mlcd", student, base)


@contextlib.contextmanager
def _swapped(params: dict, other: dict):
    """Temporarily puts `other`'s tensors into the parameters (in place, without autograd), then restores them."""
    with torch.no_grad():
        saved = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            p.copy_(other[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


def search(run: Run, model, ds) -> Strategy:
    """Stage 2: each layer's global frames under the loss threshold, from captures of few-step sampling."""
    p = run.preset
    sig = _few_step(p)
    captures = []

    def hook(layer, step, q, k, v, geometry):
        captures.append(Capture(step=step, layer=layer, q=q.detach(), k=k.detach(), v=v.detach(),
                                geometry=geometry, sample=sample_index[0]))
        return None  # the call's output stays tilewise's dense attention

    sample_index = [0]
    twd.tap(model, hook, tile=(1, p.tile[1], p.tile[2]), timesteps=sig[:-1] * 1000)
    try:
        g = run.generator(4)
        for i in range(p.search_samples):
            sample_index[0] = i
            b = run.to_run({k: v[None] for k, v in ds[i % len(ds)].items()})
            flow.sample(model, run.randn(g, b["latents"].shape), b, sig, run.autocast)
    finally:
        twd.disable(model)
    result = search_frame_patterns(captures, radius=p.radius, metric="rel_mse")
    choice = run.from_rank0(result.select(p.threshold))
    T = result.dense_frames
    geo = captures[0].geometry
    strategy = Strategy(latent=geo.latent, tile=geo.tile,
                        frame_patterns={l: gr for l, gr in choice.items() if gr[0] < T})  # g = T is dense
    strategy.search["frames"] = {"threshold": p.threshold, "metric": result.metric, "radius": p.radius,
                                 "global_frames": result.global_frames,
                                 "loss": {str(l): row.tolist() for l, row in zip(result.layers, result.loss)}}
    idx = {g: j for j, g in enumerate(result.global_frames)}
    sparsest = float(result.loss[:, 0].mean())
    chosen = float(sum(result.loss[i, idx[choice[l][0]]] for i, l in enumerate(result.layers)) / len(result.layers))
    # summary: the loss of the sparsest pattern (fewest global frames) and of the chosen ones, both averaged over
    # layers; steps = captured attention calls
    run.write_summary("search", sparsest, chosen, len(captures))
    if run.rank == 0:
        strategy.save(Path(run.out) / "search.json")
    run.log("search: global frames per layer " + ", ".join(f"{l}: {g}" for l, (g, _) in sorted(choice.items())) +
            f" (of {T})")
    return strategy


def kd(run: Run, few, teacher, strategy: Strategy, ds):
    """Stage 3: the sparse few-step student (from `few`, fp32) learns from the dense few-step model (teacher, its
    frozen copy)."""
    p = run.preset
    sig = _few_step(p)
    dev_sig = sig[:-1].to(run.device)
    student = common.student(few, run, lora_rank=p.lora_rank, strategy=strategy, timesteps=sig[:-1] * 1000)
    distill = common.Distillation(run, student, teacher)
    _, w_attn, w_final = p.loss_weights
    g = run.generator(6)
    checked = []

    def loss_fn(step, batch):
        x0 = batch["latents"]
        B = x0.shape[0]
        noise = run.batch_randn(g, x0.shape)
        sigma = dev_sig[run.batch_randint(g, len(dev_sig), (B,))]
        x = flow.noised(x0, noise, sigma)
        v_s, v_t, attention_loss = distill(x, sigma, batch, w_attn)
        if not checked and strategy.frame_patterns:
            checked.append(step)
            common.check_routed(student, "kd")
        return (w_final or 1.0) * F.mse_loss(v_s, v_t) + attention_loss

    distill.train("kd", p.kd_steps, loss_fn, common.batch_source(run, ds, 6), p.lora_rank, lr=p.distill_lr)
    out = unwrap(student)
    out.disable_gradient_checkpointing()
    return out.eval()


def parse_stages(text) -> list:
    stages = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"invalid stages = {text!r}: expected a comma-separated subset of {','.join(STAGES)}")
    return [s for s in STAGES if s in stages]  # always in pipeline order


def train_evdit(run: Run, *, stages=STAGES, data_dir: Optional[str] = None, model_dir: Optional[str] = None,
                strategy_file: Optional[str] = None) -> dict:
    """Runs the selected stages (in order) into run.out; returns the summary."""
    p = run.preset
    stages = parse_stages(stages)
    tile_file = None
    if "kd" in stages and "search" not in stages:  # checked before any work
        tile_file = strategy_file or (Path(run.out) / "search.json")
        if not Path(tile_file).exists():
            raise ValueError(f"invalid strategy = {str(tile_file)!r}: kd needs the attention tile pattern; run "
                             "the search stage first or pass --strategy FILE")
    ds = common.dataset(p, data_dir)
    base = common.base_model(run, model_dir, ds)
    teacher = common.frozen_copy(base, run)
    # stage 1, or its earlier result, or (alone) the base model
    if "mlcd" in stages:
        few = mlcd(run, base, teacher, ds)  # a stage finished earlier reloads from its checkpoint instead of training
    else:
        few = common.load_stage_model(run, "mlcd", base)
        if few is None:
            run.log("no mlcd.safetensors in the output folder: the later stages start from the base model")
            few = base
    strategy = None
    if "search" in stages:
        saved = Path(run.out) / "search.json"
        if run.resume and saved.exists() and "search" in run.summary["stages"]:
            strategy = Strategy.coerce(str(saved))
            run.log("search: finished in a previous run, search.json reused")
        else:
            strategy = search(run, few, ds)
    if "kd" in stages:
        if strategy is None:
            strategy = Strategy.coerce(str(tile_file))
        dense_few = common.frozen_copy(few, run)
        sparse = kd(run, few, dense_few, strategy, ds)
        if p.eval_samples > 0:
            _evaluate(run, ds, teacher, few, sparse, base)
    return run.summary


def _evaluate(run: Run, ds, teacher, few, sparse, base) -> None:
    p = run.preset
    many = flow.schedule(p.teacher_steps, p.shift)
    fs = _few_step(p)
    err = common.proxy_error(run, ds, teacher, many, {
        "base_few_step": (base, fs),           # the untrained model sampled with few steps: the baseline
        "mlcd_dense_few_step": (few, fs),
        "evdit_sparse_few_step": (sparse, fs),
    })
    run.write_json("eval.json", {"reference": f"dense teacher, {p.teacher_steps} Euler steps",
                                 "few_steps": p.student_steps, "rel_error": err, "samples": p.eval_samples})
    run.log("proxy error vs the teacher's many-step samples: " + ", ".join(f"{k} {v:.4g}" for k, v in err.items()))
