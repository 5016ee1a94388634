"""Mutual self-attention (MasaCtrl) for denoising the [reference, edited] pair.

The official controller counts attention calls in execution order: call // 2 is the transformer-block
index, 0-5 in the down path, 6 in the mid block, 7-15 in up_blocks[1..3]. Blocks >= start_layer (10 by
default: all of up_blocks[2] and up_blocks[3]) have their *self*-attention replaced, from denoising step
start_step on: both branches' queries attend to the reference branch's keys and values, so the reference
branch is unchanged and the edited branch borrows its appearance. Cross-attention is untouched. Here the
block indices are assigned statically, which is the same thing without a per-call counter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

N_TRANSFORMER_BLOCKS = 16  # SD-1.x


def transformer_blocks(unet) -> list:
    """The UNet's BasicTransformerBlocks in execution order (down, mid, up)."""
    blocks = []
    for part in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for t2d in getattr(part, "attentions", None) or []:
            blocks.extend(t2d.transformer_blocks)
    return blocks


class MutualAttentionControl:
    """Shared state of the mutual-attention processors: the current denoising step."""

    def __init__(self, start_step: int = 0, start_layer: int = 10):
        self.start_step = start_step
        self.start_layer = start_layer
        self.step = 0

    def active(self) -> bool:
        return self.step >= self.start_step


class MutualSelfAttnProcessor:
    def __init__(self, control: MutualAttentionControl):
        self.control = control
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if not self.control.active() or encoder_hidden_states is not None or hidden_states.shape[0] < 2:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        assert attn.spatial_norm is None and attn.group_norm is None and hidden_states.ndim == 3
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        d = k.shape[-1] // attn.heads

        def heads(x):
            return x.view(x.shape[0], -1, attn.heads, d).transpose(1, 2)

        # every branch attends to branch 0 (the reference): K/V of the reference, broadcast over the batch
        out = F.scaled_dot_product_attention(heads(q), heads(k[:1]).expand(b, -1, -1, -1),
                                             heads(v[:1]).expand(b, -1, -1, -1))
        out = out.transpose(1, 2).reshape(b, n, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class mutual_attention:
    """Context manager: install mutual self-attention on blocks >= start_layer, restore on exit."""

    def __init__(self, unet, start_step: int = 0, start_layer: int = 10):
        self.unet = unet
        self.control = MutualAttentionControl(start_step, start_layer)

    def __enter__(self) -> MutualAttentionControl:
        self._saved = []
        proc = MutualSelfAttnProcessor(self.control)
        for i, block in enumerate(transformer_blocks(self.unet)):
            if i >= self.control.start_layer:
                self._saved.append((block.attn1, block.attn1.processor))
                block.attn1.set_processor(proc)
        return self.control

    def __exit__(self, *exc):
        for attn, p in self._saved:
            attn.set_processor(p)
        return False
