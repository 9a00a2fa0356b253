"""HunyuanVideo: joint attention over [video | text], the text padding from the attention mask."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from tilewise import parallel
from tilewise.diffusers._controller import Processor, context_parallel
from tilewise.diffusers._family import Family, register


def _rope_prefix(x, n: int, emb) -> tuple:
    """diffusers' apply_rotary_emb on the first n positions of a [B, S, H, D] tensor: (those, the rest unchanged),
    not concatenated (the attention joins them, or under context parallelism packs them for the all-to-all)."""
    from diffusers.models.embeddings import apply_rotary_emb
    if n == x.shape[1]:
        return (apply_rotary_emb(x, emb, sequence_dim=1),)
    return apply_rotary_emb(x[:, :n], emb, sequence_dim=1), x[:, n:]


class _RotaryInto(parallel.Producer):
    """diffusers' apply_rotary_emb (use_real, pairs interleaved: HunyuanVideo's) on a [B, n, H, D] tensor, written
    by its last kernel into a slot of the all-to-all's send buffer (tilewise.parallel.Producer): the same
    operations, so the same bits, and no packing copy after them."""

    def __init__(self, x: torch.Tensor, emb):
        super().__init__(x.shape, x.dtype, x.device)
        self.x, self.emb = x, emb

    def write(self, dst, P: int, lo: int, hi: int) -> None:
        x = self.x.unflatten(2, (P, -1))[:, :, :, lo:hi]  # [B, n, P, h, D], a view
        cos, sin = (t.to(x.device)[None, :, None, None, :] for t in self.emb)
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
        dst.copy_(x.float() * cos + x_rotated.float() * sin)  # apply_rotary_emb's .to(x.dtype), into place


def _rope_prefix_into(x, n: int, emb) -> tuple:
    """_rope_prefix with the rotated part as a _RotaryInto (written into the send buffer)."""
    return (_RotaryInto(x[:, :n], emb),) + ((x[:, n:],) if n < x.shape[1] else ())


def _split_prefix(x, n: int) -> tuple:
    """(the first n positions, the rest) of a [B, S, H, D] tensor, as views; one part when n covers it."""
    return (x,) if n == x.shape[1] else (x[:, :n], x[:, n:])


def _project_heads(attn, x, projections, norm_q, norm_k):
    """q, k, v of `x` as [B, S, heads, D] through three projections, with the optional q/k norms applied."""
    q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projections)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class _InFlight(NamedTuple):
    """A single-stream block's attention started before its MLP (HunyuanVideoProcessor.start_before_mlp): the
    joined input it was computed from, the video length, finish() -> the attention output [B, S, H, D], and the
    dtype of q (the output's)."""
    x: torch.Tensor
    n_video: int
    finish: Callable
    dtype: torch.dtype

    def serves(self, hidden_states, encoder_hidden_states) -> bool:
        """Whether the attention module's call is on the two parts of x (the block's own slices of it)."""
        x, n = self.x, self.n_video
        return (encoder_hidden_states is not None and hidden_states.shape[1] == n
                and hidden_states.shape[1] + encoder_hidden_states.shape[1] == x.shape[1]
                and hidden_states.data_ptr() == x.data_ptr() and encoder_hidden_states.data_ptr() == x[:, n:].data_ptr()
                and hidden_states.stride() == x.stride() and encoder_hidden_states.stride() == x.stride())


class HunyuanVideoProcessor(Processor):
    """HunyuanVideo's joint attention ([video | text], text padding from the attention mask) on tilewise.

    Under context parallelism a single-stream block's attention starts before the block's MLP (hooks installed by
    the family): its q, k, v are projected from the MLP's own input and their all-to-all is issued there, so the
    exchange runs under the MLP's GEMM; the attention module's call then finds it in flight."""

    _in_flight: Optional[_InFlight] = None
    _block_args: Optional[tuple] = None  # (text length, attention_mask, image_rotary_emb) of the running block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_video = hidden_states.shape[1]
        started, self._in_flight = self._in_flight, None
        if started is not None and started.serves(hidden_states, encoder_hidden_states):
            out, dtype = started.finish(), started.dtype
            if not torch.compiler.is_compiling():
                self.ctrl.started_early += 1
        else:
            front = self._front(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            if front is None:
                self.ctrl.count("original")
                return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            self.ctrl.count("tilewise")
            out, dtype = self.attend(*front), front[0][0].dtype
        out = out.flatten(2, 3).to(dtype)
        if encoder_hidden_states is None:
            return out, None
        out, text_out = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out

    def _front(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, joined=None):
        """attend's arguments for this call (q, k, v as [video, text] parts after norms and RoPE), or None where the
        model's processor runs it. joined: [hidden_states | encoder_hidden_states] when the caller has it."""
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
            return None

        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        x = hidden_states
        if single_stream:
            x = joined if joined is not None else torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = _project_heads(attn, x, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)
        # q, k, v as tuples of [video, text] parts (one part without text): `attend` joins them, or under context
        # parallelism packs them for the all-to-all without a concatenation first
        if image_rotary_emb is not None:  # RoPE on the video positions only
            # Under context parallelism without autograd, RoPE's last kernel writes into the all-to-all's send
            # buffer (no packing copy of the video parts of q and k)
            into = cp is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and \
                not torch.is_autocast_enabled(x.device.type)
            rope = _rope_prefix_into if into else _rope_prefix
            q, k = rope(q, n_video, image_rotary_emb), rope(k, n_video, image_rotary_emb)
            if into:  # never while compiling (into excludes it)
                self.ctrl.rotary_in_place += 1
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
        return q, k, v, spec, text_len, "last", (("video", video_all), ("text", text_all))

    # --- a single-stream block's attention before its MLP (context parallelism only) ---
    def remember_block_args(self, block, args, kwargs):
        """Forward pre-hook of the single-stream block: what its attention call will get besides the MLP's
        input. HunyuanVideoSingleTransformerBlock.forward(hidden_states, encoder_hidden_states, temb,
        attention_mask=None, image_rotary_emb=None)."""
        self._in_flight = None
        if context_parallel(self) is None or not self.ctrl.early_start:
            self._block_args = None
            return
        names = ("hidden_states", "encoder_hidden_states", "temb", "attention_mask", "image_rotary_emb")
        given = dict(zip(names, args), **kwargs)
        encoder = given.get("encoder_hidden_states")
        self._block_args = None if encoder is None else \
            (encoder.shape[1], given.get("attention_mask"), given.get("image_rotary_emb"))

    def start_before_mlp(self, attn, x: torch.Tensor) -> None:
        """Forward pre-hook of the block's proj_mlp, whose input x is the attention's too ([video | text] after
        the norm): projects q, k, v and issues their all-to-all, to be finished by the attention call."""
        block_args, self._block_args = self._block_args, None
        if block_args is None:
            return
        n_text, attention_mask, image_rotary_emb = block_args
        n_video = x.shape[1] - n_text
        front = self._front(attn, x[:, :n_video], x[:, n_video:], attention_mask, image_rotary_emb, joined=x)
        if front is None:  # the attention call routes itself (to the model's processor)
            return
        self.ctrl.count("tilewise")
        self._in_flight = _InFlight(x, n_video, self.attend_start(*front), front[0][0].dtype)


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
    def install_hooks(model, processors: list) -> list:
        """Each single-stream block's attention starts before the block's MLP under context parallelism (see
        HunyuanVideoProcessor): a pre-hook on the block records its arguments, one on its proj_mlp starts."""
        handles = []
        first = len(model.transformer_blocks)
        for block, proc in zip(model.single_transformer_blocks, processors[first:]):
            handles.append(block.register_forward_pre_hook(proc.remember_block_args, with_kwargs=True))
            handles.append(block.proj_mlp.register_forward_pre_hook(
                lambda module, args, proc=proc, attn=block.attn: proc.start_before_mlp(attn, args[0])))
        return handles

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
