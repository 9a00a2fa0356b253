"""STA fine-tuning: the model with Sliding Tile Attention at fixed (or calibrated) windows learns to recover the
dense model's quality. Loss (the STA paper's three terms, weights configurable):

    w_data * ||v_student(x_t) - (noise - x0)||^2          flow matching on the data
  + w_attn * mean_l ||attn_l^student - attn_l^teacher||^2  attention outputs of every self-attention layer
  + w_final * ||v_student(x_t) - v_teacher(x_t)||^2       the final layer (the prediction)

against the frozen dense teacher on the same noisy input. Stages: "pretrain" (only when the preset asks), then
"sta". Writes strategy.json (the windows), sta.safetensors (the student) and summary.json in the output folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import tilewise.calibrate as cal
from tilewise.calibrate.strategy import Strategy
from tilewise.train import common, flow
from tilewise.train.loop import Run, unwrap


def windows(run: Run, teacher, ds, strategy_file: Optional[str]) -> Strategy:
    """The student's windows: a strategy file, the preset's fixed window, or a live calibration on the teacher
    (errors of every candidate against dense attention during a dense sampling; the cheapest windows within the
    rel_mse budget). A calibration done by an earlier run of this folder is reused."""
    p = run.preset
    saved = Path(run.out) / "strategy.json"
    if strategy_file is not None:
        s = Strategy.coerce(strategy_file)
    elif p.window is not None:
        s = Strategy(default=tuple(p.window), tile=tuple(p.tile))
    elif run.resume and saved.exists():
        return Strategy.coerce(str(saved))
    elif p.calibrate:
        sig = flow.schedule(p.teacher_steps, p.shift)
        b = run.to_run({k: v[None] for k, v in ds[0].items()})
        noise = run.randn(run.generator(5), b["latents"].shape)
        with cal.capture(teacher, candidates=[tuple(c) for c in p.calibrate], tile=tuple(p.tile),
                         timesteps=sig[:-1] * 1000) as cap:
            flow.sample(teacher, noise, b, sig, run.autocast)
        s = run.from_rank0(cap.result().select(budget=p.budget, metric="rel_mse"))
        run.log(f"calibrated windows: {len(s.windows)} (step, layer, head) keys within rel_mse {p.budget}")
    else:
        raise ValueError("windows: give --window KTxKHxKW, --strategy FILE or --calibrate CANDIDATES")
    if run.rank == 0:
        s.save(saved)
    return s


def train_sta(run: Run, *, data_dir: Optional[str] = None, model_dir: Optional[str] = None,
              strategy_file: Optional[str] = None) -> dict:
    """Runs the STA recipe into run.out; returns the summary."""
    p = run.preset
    ds = common.dataset(p, data_dir)
    base = common.base_model(run, model_dir, ds)
    teacher = common.frozen_copy(base, run)
    strategy = windows(run, teacher, ds, strategy_file)
    timesteps = flow.schedule(p.teacher_steps, p.shift)[:-1] * 1000  # the step index of per-step windows
    student = common.student(base, run, lora_rank=p.lora_rank, strategy=strategy, timesteps=timesteps)
    distill = common.Distillation(run, student, teacher)
    w_data, w_attn, w_final = p.loss_weights
    g = run.generator(2)
    checked = []

    def loss_fn(step, batch):
        x0 = batch["latents"]
        noise = run.batch_randn(g, x0.shape)
        sigma = flow.shifted(run.batch_rand(g, x0.shape[:1]), p.shift)
        x = flow.noised(x0, noise, sigma)
        v_s, v_t, attention_loss = distill(x, sigma, batch, w_attn)
        if not checked:  # once, on the first step this process runs
            checked.append(step)
            common.check_routed(student, "sta")
        return (w_data * F.mse_loss(v_s, flow.flow_matching_target(x0, noise)) + w_final * F.mse_loss(v_s, v_t)
                + attention_loss)

    distill.train("sta", p.sta_steps, loss_fn, common.batch_source(run, ds, 2), p.lora_rank)
    if p.eval_samples > 0:
        m = unwrap(student).eval()
        m.disable_gradient_checkpointing()
        untuned = common.student(base, run, lora_rank=0, strategy=strategy, timesteps=timesteps).eval()
        sig = flow.schedule(p.teacher_steps, p.shift)
        err = common.proxy_error(run, ds, teacher, sig, {"sta_finetuned": (m, sig), "sta_untuned": (untuned, sig)})
        fm = common.heldout_flow_loss(run, ds, {"teacher_dense": teacher, "sta_untuned": untuned,
                                                "sta_finetuned": m}, p.eval_samples)
        run.write_json("eval.json", {"reference": f"dense teacher, {p.teacher_steps} Euler steps",
                                     "rel_error": err, "flow_matching_loss": fm, "samples": p.eval_samples})
        run.log("held-out flow-matching loss: " + ", ".join(f"{k} {v:.4g}" for k, v in fm.items()))
        run.log("proxy error vs the dense teacher: " + ", ".join(f"{k} {v:.4g}" for k, v in err.items()))
    return run.summary
