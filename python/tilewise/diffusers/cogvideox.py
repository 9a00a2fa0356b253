"""CogVideoX: joint attention over [text | video], all text valid."""
from __future__ import annotations

import torch

from tilewise.diffusers._controller import Processor, context_parallel
from tilewise.diffusers._family import Family, register


class CogVideoXProcessor(Processor):
    """CogVideoX's joint attention ([text | video], all text valid) on tilewise."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        spec = None
        cp = context_parallel(self)  # diffusers' context parallelism: this rank's chunks of the text and the video
        n_video = hidden_states.shape[1] if cp is None else cp.video_tokens(self.ctrl, hidden_states.shape[1])
        if attention_mask is None:
            spec = self.ctrl.route(self, attn, hidden_states, n_video)
        if spec is None:
            self.ctrl.count("original")
            return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
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
        n_text_all = n_text if cp is None else cp.total(n_text, x.device)
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec, None, "first",
                          (("text", n_text_all), ("video", n_video)))
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

    @staticmethod
    def cp_plan(model, per_token_timesteps: bool):
        """diffusers 0.42 has no context-parallel plan for CogVideoX: the text and the video tokens are split at
        the first block, the video RoPE (a model input, passed to every block) at each block, and the output
        gathered after proj_out. (Splitting the RoPE at the model's input would put a split hook on the model,
        whose post-forward refuses the model's output object.)"""
        from diffusers.models._modeling_parallel import ContextParallelInput as In, ContextParallelOutput as Out
        rope = {"image_rotary_emb": [In(split_dim=0, expected_dims=2), In(split_dim=0, expected_dims=2)]}
        plan = {f"transformer_blocks.{i}": dict(rope) for i in range(len(model.transformer_blocks))}
        plan["transformer_blocks.0"].update(hidden_states=In(split_dim=1, expected_dims=3),
                                            encoder_hidden_states=In(split_dim=1, expected_dims=3))
        plan["proj_out"] = Out(gather_dim=1, expected_dims=3)
        return plan
