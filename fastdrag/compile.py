"""The only place that calls torch.compile or captures CUDA graphs."""

from __future__ import annotations

import torch

from .unet import UNetFeatures


def compile_unet_features(uf: UNetFeatures) -> torch.nn.Module:
    """torch.compile the UNet pass that returns (eps, feature). fullgraph so that a graph break fails loudly;
    static shapes (one image size per prepared image)."""
    return torch.compile(uf, fullgraph=True, dynamic=False)


def merge_lora(unet) -> int:
    """Fold the active LoRA into the base weights (one matmul per projection instead of three). Returns the number
    of merged layers. Undo with unmerge_lora before changing or reading the adapter weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for m in unet.modules():
        if isinstance(m, BaseTunerLayer) and not m.merged:
            m.merge()
            n += 1
    return n


def unmerge_lora(unet) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for m in unet.modules():
        if isinstance(m, BaseTunerLayer) and m.merged:
            m.unmerge()
            n += 1
    return n
