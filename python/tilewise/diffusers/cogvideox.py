"""CogVideoX: joint attention over [text | video], all text valid."""
from __future__ import annotations

import torch

from tilewise.diffusers._controller import Processor
from tilewise.diffusers._family import Family, register


class CogVideoXProcessor(Processor):
    """CogVideoX's joint attention ([text | video], all text valid) on tilewise."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        spec = None
        if attention_mask is None:
            spec = self.ctrl.route(self, attn, hidden_states, hidden_states.shape[1])
        if spec is None:
            self.ctrl.count("original")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.ctrl.count("tilewise")

        n_text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = x.shape[0]
        if type(self.original).__name__.startswith("Fused"):
            q, k, v = torch.split(attn.to_qkv(x), attn.to_qkv.out_features // 3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb
            q[:, :, n_text:] = apply_rotary_emb(q[:, :, n_text:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, n_text:] = apply_rotary_emb(k[:, :, n_text:], image_rotary_emb)
        # [B, S, H, D] views: the output comes back [B, S, H, D] contiguous, ready for the reshape.
        out = self._attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec,
                              None, "first")
        out = out.reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, out = out.split([n_text, out.shape[1] - n_text], dim=1)
        return out, text_out



@register
class CogVideoX(Family):
    """`transformer_blocks[i].attn1`; text, then video."""

    name = "CogVideoX"
    model_class = "CogVideoXTransformer3DModel"
    processor = CogVideoXProcessor

    @staticmethod
    def latent(config, shape):  # hidden_states [B, F, C, H, W]
        pt = config.patch_size_t or 1
        return (shape[1] // pt, shape[3] // config.patch_size, shape[4] // config.patch_size)

    @staticmethod
    def attention_modules(model):
        return [b.attn1 for b in model.transformer_blocks]
