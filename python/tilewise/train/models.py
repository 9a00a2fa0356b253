"""Presets (model, data and schedule of a recipe run) and the adapters that call a diffusers video transformer
the same way for every family: velocity = call(model, latents [B, C, F, H, W], sigma [B], batch).

Timesteps follow diffusers' flow-matching schedulers: timestep = 1000 * sigma, x_sigma = (1 - sigma) x0 +
sigma * noise, and the model predicts the velocity noise - x0."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Preset:
    """Everything a recipe run needs besides its output folder; the CLI overrides single fields."""

    name: str
    family: str                       # "wan", "cogvideox" or "hunyuan"
    model: dict                       # config kwargs of the diffusers transformer (random initialisation)
    latent: tuple                     # (C, F, H, W) of one sample, before patch embedding
    text_len: int
    text_dim: int
    samples: int                      # size of the synthetic data set
    batch: int = 1
    lr: float = 1e-3
    # Learning rate of the distillation stages (evdit's mlcd and kd; None: lr). Their losses start near zero when
    # the student begins as the teacher, and AdamW then moves every weight by about lr per step on gradient noise.
    distill_lr: Optional[float] = None
    seed: int = 0
    tile: tuple = (6, 8, 8)
    window: Optional[tuple] = (3, 3, 3)   # fixed STA window, or None with `calibrate`
    calibrate: Optional[list] = None      # STA candidates for a live calibration on the teacher
    budget: float = 0.05                  # rel_mse budget of that calibration
    shift: float = 1.0                    # sigma shift of the sampling schedules (Wan uses 3-5)
    pretrain_steps: int = 0               # dense flow-matching steps that make the random teacher a real model
    sta_steps: int = 20
    loss_weights: tuple = (1.0, 1.0, 1.0)  # (flow matching, attention outputs, final layer)
    lora_rank: int = 0                    # 0: full fine-tuning
    mlcd_steps: int = 20
    teacher_steps: int = 16               # the many-step ODE the consistency distillation follows
    segments: int = 4
    student_steps: int = 4                # a multiple of segments
    ema: float = 0.9                      # EMA decay of the consistency target
    threshold: float = 0.1                # search: largest rel_mse loss of a layer's frame pattern
    radius: int = 0
    search_samples: int = 1
    kd_steps: int = 20
    gradient_checkpointing: bool = False
    save_every: int = 50
    log_window: int = 5                   # running-mean length of first_loss / last_loss
    eval_samples: int = 0                 # > 0: the proxy error (few-step student vs many-step teacher)

    def replace(self, **kw) -> "Preset":
        return dataclasses.replace(self, **kw)


PRESETS = {
    # 4x16x16 latent (4x8x8 = 256 tokens after the 1x2x2 patch), 2 blocks of width 32: every stage of both recipes
    # in seconds on 2 CPU cores, yet with conditioning and motion to learn. distill_lr: mlcd and kd at lr / 4 (the
    # proxy error after MLCD, 30 steps: 0.0022 at lr, 0.00085 at lr / 4; at 10 lr, 3x the undistilled 0.0029).
    "tiny": Preset(
        name="tiny", family="wan",
        model=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                   out_channels=4, text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32),
        latent=(4, 4, 16, 16), text_len=4, text_dim=16, samples=16, batch=2, lr=2e-3, distill_lr=5e-4,
        tile=(1, 4, 4), window=None, calibrate=[(1, 1, 1), (2, 1, 1), (1, 2, 2), (3, 1, 1)], budget=0.2,
        sta_steps=30, mlcd_steps=30, teacher_steps=8, segments=2, student_steps=2, kd_steps=30,
        threshold=0.05, save_every=10, log_window=8, gradient_checkpointing=True, eval_samples=2),
    # About 340M parameters (20 Wan blocks of width 1024, head dim 64), a 16x12x64x64 latent (12x32x32 = 12288
    # tokens): 200 steps per stage, one recipe per H200 call (measured alone: about 0.55 s per step, so evdit's
    # pretrain + mlcd + kd take about 6 of the call's 10 minutes), and the proxy error at the end. At lr 1e-4
    # MLCD and KD made the proxy error worse (0.08 -> 0.28 -> 0.34, docs/bench/h200-train-v1.md), as a 10x too
    # large lr does on `tiny`; distill_lr 1e-5 since (not yet run on the H200).
    "h200": Preset(
        name="h200", family="wan",
        model=dict(patch_size=(1, 2, 2), num_attention_heads=16, attention_head_dim=64, in_channels=16,
                   out_channels=16, text_dim=256, freq_dim=256, ffn_dim=4096, num_layers=20, rope_max_seq_len=1024),
        latent=(16, 12, 64, 64), text_len=8, text_dim=256, samples=256, batch=1, lr=1e-4, distill_lr=1e-5,
        tile=(6, 8, 8), window=(1, 3, 3), shift=3.0, pretrain_steps=200, sta_steps=200, mlcd_steps=200,
        teacher_steps=32, segments=4, student_steps=4, ema=0.95, threshold=0.05, search_samples=2, kd_steps=200,
        gradient_checkpointing=True, save_every=50, log_window=20, eval_samples=4),
}


def model_class(family: str):
    import diffusers

    names = {"wan": "WanTransformer3DModel", "cogvideox": "CogVideoXTransformer3DModel",
             "hunyuan": "HunyuanVideoTransformer3DModel"}
    if family not in names:
        raise ValueError(f"invalid family = {family!r}: expected one of {', '.join(names)}")
    return getattr(diffusers, names[family])


def build_model(preset: Preset, model_dir: Optional[str] = None):
    """The preset's transformer, random-initialised from preset.seed (same weights on every call and rank), or
    a diffusers transformer folder (save_pretrained / a model repo's `transformer/` folder)."""
    cls = model_class(preset.family)
    if model_dir is not None:
        return cls.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        return cls(**preset.model)


def family_of_model(model) -> str:
    for fam in ("wan", "cogvideox", "hunyuan"):
        if isinstance(model, model_class(fam)):
            return fam
    raise TypeError(f"model: expected a Wan, CogVideoX or HunyuanVideo transformer, got {type(model).__name__}")


def _cogvideox_rope(model, latents):
    """CogVideoX 1.0's 3D RoPE for this latent size (what its pipeline computes), or None without RoPE."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = model.config
    if not cfg.use_rotary_positional_embeddings:
        return None
    p = cfg.patch_size
    gh, gw = latents.shape[3] // p, latents.shape[4] // p
    crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), latents.shape[2],
                                   device=latents.device)


def call(model, latents, sigma, batch: dict):
    """The model's velocity prediction for latents [B, C, F, H, W] at noise levels sigma [B] (in [0, 1]);
    batch holds "text" [B, L, D] and optionally "text_mask" [B, L] and "pooled" [B, P]. Same layout out."""
    fam = family_of_model(model.module if hasattr(model, "module") else model)
    inner = model.module if hasattr(model, "module") else model
    timestep = sigma * 1000.0
    text = batch["text"]
    if fam == "wan":
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    if fam == "cogvideox":
        x = latents.transpose(1, 2)  # CogVideoX takes [B, F, C, H, W]
        out = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                    image_rotary_emb=_cogvideox_rope(inner, latents), return_dict=False)[0]
        return out.transpose(1, 2)
    B = latents.shape[0]
    mask = batch.get("text_mask")
    if mask is None:
        mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
    pooled = batch.get("pooled")
    if pooled is None:
        pooled = text.new_zeros(B, inner.config.pooled_projection_dim)
    guidance = torch.full((B,), 1000.0, device=latents.device)  # distilled guidance 1 (x1000, as its pipeline)
    return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, encoder_attention_mask=mask,
                 pooled_projections=pooled, guidance=guidance, return_dict=False)[0]


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())

