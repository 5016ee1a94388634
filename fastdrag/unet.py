"""The UNet pass of the drag loop: returns eps and the decoder feature map in one forward."""

from __future__ import annotations

import torch


def feature_block(unet, feature_idx: int) -> torch.nn.Module:
    """Official indexing: 0 = mid block, k = up_blocks[k-1] (output after its upsampler)."""
    return unet.mid_block if feature_idx == 0 else unet.up_blocks[feature_idx - 1]


class UNetFeatures(torch.nn.Module):
    """(z, t, c) -> (eps [B,4,h,w], feat [B,C,h',w']): one UNet pass that also returns a decoder block's output.

    The feature is taken with a forward hook that is installed once: it only records while this wrapper is
    running, so LoRA training and denoising through the same UNet are unaffected.
    """

    def __init__(self, unet, feature_idx: int = 3):
        super().__init__()
        self.unet = unet
        self.feature_idx = feature_idx
        self._feat = None
        self._recording = False
        self._hook = feature_block(unet, feature_idx).register_forward_hook(self._record)

    def _record(self, module, args, output):
        if self._recording:
            self._feat = output

    def forward(self, z: torch.Tensor, t, c: torch.Tensor):
        self._recording = True
        try:
            eps = self.unet(z, t, encoder_hidden_states=c, return_dict=False)[0]
        finally:
            self._recording = False
        feat, self._feat = self._feat, None
        return eps, feat

    def close(self):
        self._hook.remove()
