"""HunyuanVideo: joint attention over [video | text], the text padding from the attention mask."""
from __future__ import annotations

import torch

from tilewise.diffusers._controller import Processor, context_parallel
from tilewise.diffusers._family import Family, register


def _rope_prefix(x, n: int, emb) -> tuple:
    """diffusers' apply_rotary_emb on the first n positions of a [B, S, H, D] tensor: (those, the rest unchanged),
    not concatenated (the attention joins them, or under context parallelism packs them for the all-to-all)."""
    from diffusers.models.embeddings import apply_rotary_emb
    if n == x.shape[1]:
        return (apply_rotary_emb(x, emb, sequence_dim=1),)
    return apply_rotary_emb(x[:, :n], emb, sequence_dim=1), x[:, n:]


def _split_prefix(x, n: int) -> tuple:
    """(the first n positions, the rest) of a [B, S, H, D] tensor, as views; one part when n covers it."""
    return (x,) if n == x.shape[1] else (x[:, :n], x[:, n:])


def _project_heads(attn, x, projections, norm_q, norm_k):
    """q, k, v of `x` as [B, S, heads, D] through three projections, with the optional q/k norms applied."""
    q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projections)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class HunyuanVideoProcessor(Processor):
    """HunyuanVideo's joint attention ([video | text], text padding from the attention mask) on tilewise."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_video = hidden_states.shape[1]
        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        # Under diffusers' context parallelism hidden_states / encoder_hidden_states are this rank's chunks and
        # the mask (built by the model before the split) covers the whole sequence.
        cp = context_parallel(self)
        video_all = n_video if cp is None else cp.video_tokens(self.ctrl, n_video)
        spec = self.ctrl.route(self, attn, hidden_states, video_all)
        batch = hidden_states.shape[0]
        if cp is None:
            text_all = n_text
        elif attention_mask is not None:
            text_all = attention_mask.numel() // batch - video_all
        else:
            text_all = cp.total(n_text, hidden_states.device)
        seq = video_all + text_all
        mask_ok = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.numel() == batch * seq)
        if spec is None or not mask_ok or (encoder_hidden_states is not None and n_text == 0):
            self.ctrl.count("original")
            return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.ctrl.count("tilewise")

        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single_stream else hidden_states
        q, k, v = _project_heads(attn, x, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)
        # q, k, v as tuples of [video, text] parts (one part without text): `attend` joins them, or under context
        # parallelism packs them for the all-to-all without a concatenation first
        if image_rotary_emb is not None:  # RoPE on the video positions only
            q, k = _rope_prefix(q, n_video, image_rotary_emb), _rope_prefix(k, n_video, image_rotary_emb)
        else:
            q, k = _split_prefix(q, n_video), _split_prefix(k, n_video)
        v = _split_prefix(v, n_video)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            added = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            eq, ek, ev = _project_heads(attn, encoder_hidden_states, added, attn.norm_added_q, attn.norm_added_k)
            q, k, v = q + (eq,), k + (ek,), v + (ev,)

        # The mask keeps the first n_video + text_len[b] keys: its text part counts the valid text tokens.
        text_len = None if attention_mask is None or n_text == 0 else \
            attention_mask.reshape(batch, seq)[:, video_all:].sum(dim=1, dtype=torch.int32)
        out = self.attend(q, k, v, spec, text_len, "last", (("video", video_all), ("text", text_all))) \
            .flatten(2, 3).to(q[0].dtype)

        if encoder_hidden_states is None:
            return out, None
        out, text_out = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out



@register
class HunyuanVideo(Family):
    """`transformer_blocks[i].attn`, then `single_transformer_blocks[i].attn`; video, then text; text_len from
    the text padding mask, per batch, on the device."""

    name = "HunyuanVideo"
    model_class = "HunyuanVideoTransformer3DModel"
    processor = HunyuanVideoProcessor

    @staticmethod
    def latent(config, shape):  # hidden_states [B, C, F, H, W]
        return (shape[2] // config.patch_size_t, shape[3] // config.patch_size, shape[4] // config.patch_size)

    @staticmethod
    def attention_modules(model):
        return [b.attn for b in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]

    @staticmethod
    def cp_plan(model, per_token_timesteps: bool):
        """diffusers 0.42 has no context-parallel plan for HunyuanVideo: the RoPE tables are split where they are
        made, the video and text tokens at the first dual-stream block (they flow sharded through the
        single-stream ones), the output gathered after proj_out. The attention mask stays whole (tilewise reads
        the text lengths from it)."""
        from diffusers.models._modeling_parallel import ContextParallelInput as In, ContextParallelOutput as Out
        return {
            "rope": {0: In(split_dim=0, expected_dims=2, split_output=True),
                     1: In(split_dim=0, expected_dims=2, split_output=True)},
            "transformer_blocks.0": {"hidden_states": In(split_dim=1, expected_dims=3),
                                     "encoder_hidden_states": In(split_dim=1, expected_dims=3)},
            "proj_out": Out(gather_dim=1, expected_dims=3),
        }
