"""The UNet pass of the drag loop: returns eps and the decoder feature map in one forward, or, when eps is not read
(a drag loss without its mask term), the feature map alone from a pass that stops after the feature block."""

from __future__ import annotations

import torch


def feature_block(unet, feature_idx: int) -> torch.nn.Module:
    """Official indexing: 0 = mid block, k = up_blocks[k-1] (output after its upsampler)."""
    return unet.mid_block if feature_idx == 0 else unet.up_blocks[feature_idx - 1]


class _Tap:
    """The one forward hook on a feature block, shared by every UNetFeatures that reads that block. It records
    the block's output only while one of them is running, so LoRA training and denoising are unaffected.

    One hook per block, not one per UNetFeatures: torch.compile guards on the number of hooks of the modules it
    traces, so a hook per wrapper would make every new Editor (or an eager wrapper alive beside a compiled one)
    recompile the UNet pass, and fullgraph=True turns the 9th such recompile into an error."""

    def __init__(self, block: torch.nn.Module):
        self.recording = False
        self.feat = None
        self.users = 0
        self.handle = block.register_forward_hook(self.record)

    def record(self, module, args, output):
        if self.recording:
            self.feat = output


_TAP_ATTR = "_fastdrag_feature_tap"


def can_truncate(unet) -> bool:
    """Whether truncated_features reproduces this UNet's forward: an SD-1.x-style UNet2DConditionModel, without the
    class, addition or encoder-projection embeddings and input centring that its forward would also apply."""
    cfg = unet.config
    return (not cfg.get("center_input_sample", False) and cfg.get("class_embed_type") is None
            and cfg.get("addition_embed_type") is None and cfg.get("encoder_hid_dim_type") is None
            and getattr(unet, "time_embed_act", None) is None and getattr(unet, "mid_block", None) is not None)


def truncated_features(unet, z: torch.Tensor, t, c: torch.Tensor, feature_idx: int) -> torch.Tensor:
    """The output of feature_block(unet, feature_idx) for UNet(z, t, c), computed by running the UNet's own modules
    in the order and with the arguments of diffusers' UNet2DConditionModel.forward (without attention masks, class
    labels, adapters or control residuals, which the drag loop never passes) and stopping after that block: the
    blocks above it and conv_out are skipped (for SD-1.5 and up_blocks[2], 24.6% of a forward). The same ops on
    the same tensors, so the feature and its gradient are the full pass's bit for bit."""
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(d % up_factor != 0 for d in z.shape[-2:])
    emb = unet.time_embedding(unet.get_time_embed(sample=z, timestep=t), None)
    sample = unet.conv_in(z)
    res = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, more = block(hidden_states=sample, temb=emb, encoder_hidden_states=c, attention_mask=None,
                                 cross_attention_kwargs=None, encoder_attention_mask=None)
        else:
            sample, more = block(hidden_states=sample, temb=emb)
        res += more
    mid = unet.mid_block
    if getattr(mid, "has_cross_attention", False):
        sample = mid(sample, emb, encoder_hidden_states=c, attention_mask=None, cross_attention_kwargs=None,
                     encoder_attention_mask=None)
    else:
        sample = mid(sample, emb)
    if feature_idx == 0:
        return sample
    upsample_size = None
    for i, block in enumerate(unet.up_blocks[:feature_idx]):
        skips, res = res[-len(block.resnets):], res[:-len(block.resnets)]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = res[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=c,
                           cross_attention_kwargs=None, upsample_size=upsample_size, attention_mask=None,
                           encoder_attention_mask=None)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size)
    return sample


class UNetFeatures(torch.nn.Module):
    """(z, t, c) -> (eps [B,4,h,w], feat [B,C,h',w']): one UNet pass that also returns a decoder block's output.

    The feature is taken by the block's shared forward hook (_Tap), installed with the first wrapper and removed
    when the last one is closed. With with_eps=False the pass stops after the feature block and returns
    (None, feat) (truncated_features; the full pass for a UNet it does not cover)."""

    def __init__(self, unet, feature_idx: int = 3):
        super().__init__()
        self.unet = unet
        self.feature_idx = feature_idx
        block = feature_block(unet, feature_idx)
        tap = block.__dict__.get(_TAP_ATTR)
        if tap is None:
            tap = _Tap(block)
            block.__dict__[_TAP_ATTR] = tap
        tap.users += 1
        self._tap = tap
        self._closed = False
        self.truncates = can_truncate(unet)

    def forward(self, z: torch.Tensor, t, c: torch.Tensor, with_eps: bool = True):
        if not with_eps and self.truncates:
            return None, truncated_features(self.unet, z, t, c, self.feature_idx)
        tap = self._tap
        tap.recording = True
        try:
            eps = self.unet(z, t, encoder_hidden_states=c, return_dict=False)[0]
        finally:
            tap.recording = False
        feat, tap.feat = tap.feat, None
        return eps, feat

    def close(self):
        if self._closed:
            return
        self._closed = True
        tap = self._tap
        tap.users -= 1
        if tap.users == 0:
            tap.handle.remove()
            block = feature_block(self.unet, self.feature_idx)
            if block.__dict__.get(_TAP_ATTR) is tap:
                del block.__dict__[_TAP_ATTR]
