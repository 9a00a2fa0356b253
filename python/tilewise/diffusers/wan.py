"""Wan (2.1 / 2.2): video self-attention `attn1`; cross-attention `attn2` keeps its processor."""
from __future__ import annotations

import torch

from tilewise.diffusers._controller import Processor, context_parallel
from tilewise.diffusers._family import Family, register


def _rotate_pairs(x, cos, sin):
    """Wan's RoPE: rotates (x[2i], x[2i+1]) by the angle whose cosine is cos[2i] and sine sin[2i+1]."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(x.dtype)


class WanProcessor(Processor):
    """Wan's video self-attention (attn1) on tilewise; anything else goes to the original processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        spec = None
        cp = context_parallel(self)  # diffusers' context parallelism: hidden_states is this rank's video chunk
        n_video = hidden_states.shape[1] if cp is None else cp.video_tokens(self.ctrl, hidden_states.shape[1])
        if encoder_hidden_states is None and attention_mask is None and not kwargs and attn.add_k_proj is None:
            spec = self.ctrl.route(self, attn, hidden_states, n_video)
        if spec is None:
            self.ctrl.count("original")
            return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                      **kwargs)
        self.ctrl.count("tilewise")

        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if rotary_emb is not None:
            q, k = _rotate_pairs(q, *rotary_emb), _rotate_pairs(k, *rotary_emb)
        out = self.attend(q, k, v, spec, None, "last", (("video", n_video),)).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))



@register
class Wan(Family):
    """`blocks[i].attn1`; video only."""

    name = "Wan"
    model_class = "WanTransformer3DModel"
    processor = WanProcessor

    @staticmethod
    def latent(config, shape):  # hidden_states [B, C, F, H, W]
        pt, ph, pw = config.patch_size
        return (shape[2] // pt, shape[3] // ph, shape[4] // pw)

    @staticmethod
    def attention_modules(model):
        return [b.attn1 for b in model.blocks]

    @staticmethod
    def cp_plan(model, per_token_timesteps: bool):
        """The model's own plan; its split of the timestep along the sequence only for per-token timesteps (see
        tilewise.diffusers.cp_plan)."""
        plan = dict(type(model)._cp_plan)
        if not per_token_timesteps:
            plan.pop("", None)
        return plan
