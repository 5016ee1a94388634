"""The UNet pass of the drag loop: returns eps and the decoder feature map in one forward."""

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


class UNetFeatures(torch.nn.Module):
    """(z, t, c) -> (eps [B,4,h,w], feat [B,C,h',w']): one UNet pass that also returns a decoder block's output.

    The feature is taken by the block's shared forward hook (_Tap), installed with the first wrapper and removed
    when the last one is closed."""

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

    def forward(self, z: torch.Tensor, t, c: torch.Tensor):
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
