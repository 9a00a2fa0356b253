"""Tiny, randomly initialised HunyuanVideo, Wan and CogVideoX transformers (built from configs, no weights) and
inputs for them, shared by test_diffusers.py and test_calibrate_e2e.py. Import it after
pytest.importorskip("torch") and pytest.importorskip("diffusers")."""
import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

import tilewise
import tilewise.diffusers as twd

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] == 9
hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA Hopper GPU (sm_90) for the tilewise kernel")

LATENT = (3, 8, 8)  # after patch embedding, for every model below
TILE = (1, 4, 4)    # grid 3 x 2 x 2 tiles
COVER = (3, 2, 2)   # a window covering the whole grid
FAMILIES = ["hunyuan", "wan", "cogvideox"]


@pytest.fixture
def seed():
    s = int(np.random.SeedSequence().entropy % (1 << 62))
    print("seed", s)
    torch.manual_seed(s)
    return s


def build(family, head_dim=16, device="cpu", dtype=torch.float32):
    """A tiny model of `family` and inputs for it: latent LATENT, batch 2, a few text tokens."""
    B = 2
    if family == "hunyuan":
        d = head_dim // 4
        model = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(head_dim - 2 * (3 * d // 2), 3 * d // 2, 3 * d // 2))
        inputs = dict(hidden_states=torch.randn(B, 4, *LATENT), timestep=torch.tensor([900.0, 900.0]),
                      encoder_hidden_states=torch.randn(B, 6, 16),
                      encoder_attention_mask=torch.tensor([[1] * 6, [1] * 3 + [0] * 3]),  # text padding in batch 1
                      pooled_projections=torch.randn(B, 8), guidance=torch.tensor([3.0, 3.0]))
    elif family == "wan":
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                      in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                      num_layers=2, rope_max_seq_len=32)
        inputs = dict(hidden_states=torch.randn(B, 4, LATENT[0], 16, 16), timestep=torch.tensor([900, 900]),
                      encoder_hidden_states=torch.randn(B, 5, 16))
    else:
        model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                                            out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2,
                                            sample_width=16, sample_height=16, patch_size=2, max_text_seq_length=7,
                                            use_rotary_positional_embeddings=True)
        rope = get_3d_rotary_pos_embed(head_dim, ((0, 0), (8, 8)), (8, 8), LATENT[0])
        inputs = dict(hidden_states=torch.randn(B, LATENT[0], 4, 16, 16), timestep=torch.tensor([900, 900]),
                      encoder_hidden_states=torch.randn(B, 7, 16), image_rotary_emb=rope)
    model = model.eval().to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    inputs = {k: (v.to(device=device, dtype=dtype if v.is_floating_point() and k != "timestep" else v.dtype)
                  if isinstance(v, torch.Tensor) else tuple(x.to(device) for x in v)) for k, v in inputs.items()}
    return model, inputs


def run(model, inputs, **overrides):
    with torch.no_grad():
        return model(**dict(inputs, **overrides)).sample


def num_attention(model):
    return len(twd.family_of(model).attention_modules(model))


def denoise(model, inputs, scheduler, num_steps, after_step=None):
    """A plain flow-matching denoising loop over the transformer: scheduler.set_timesteps(num_steps), then per
    timestep t one forward at timestep t and one scheduler step. after_step(i, t) runs after each forward.
    Returns the final latents."""
    scheduler.set_timesteps(num_steps)
    x = inputs["hidden_states"]
    B = x.shape[0]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = model(**dict(inputs, hidden_states=x, timestep=t.expand(B).to(x.device))).sample
            if after_step is not None:
                after_step(i, t)
            x = scheduler.step(out, t, x).prev_sample
    return x


class Spy:
    """Records the windows (and precisions) of each tilewise call (in layer order within a forward)."""

    def __init__(self, monkeypatch):
        self.windows, self.frames, self.precisions = [], [], []
        real_sta, real_tile = tilewise.sliding_tile_attention, tilewise.attention_tile

        def sta(*a, window, **kw):
            self.windows.append(tuple(tuple(w) for w in window))
            self.precisions.append(kw.get("precision", "native"))
            return real_sta(*a, window=window, **kw)

        def frame(*a, global_frames, radius, **kw):
            self.frames.append((global_frames, radius, kw["tile"]))
            return real_tile(*a, global_frames=global_frames, radius=radius, **kw)

        monkeypatch.setattr(tilewise, "sliding_tile_attention", sta)
        monkeypatch.setattr(tilewise, "attention_tile", frame)

    def take(self):
        out, self.windows = self.windows, []
        return out
