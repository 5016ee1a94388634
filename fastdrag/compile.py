"""The only place that calls torch.compile or captures CUDA graphs."""

from __future__ import annotations

import torch

from .unet import UNetFeatures


class CompiledUNetFeatures(torch.nn.Module):
    """A UNetFeatures whose drag-loop pass (autograd on) is torch.compile'd. Calls with grad off (the reference pass,
    once per prepared image) run eager: compiling them would build and compile a second graph (torch.compile guards
    on the grad mode) for a pass that runs once per image."""

    def __init__(self, uf: UNetFeatures, backend: str = "inductor"):
        super().__init__()
        self.eager = uf
        self.compiled = torch.compile(uf, fullgraph=True, dynamic=False, backend=backend)

    def forward(self, z: torch.Tensor, t, c: torch.Tensor):
        return (self.compiled if torch.is_grad_enabled() else self.eager)(z, t, c)

    def close(self):
        self.eager.close()


def compile_unet_features(uf: UNetFeatures, backend: str = "inductor") -> CompiledUNetFeatures:
    """torch.compile the UNet pass that returns (eps, feature). fullgraph so that a graph break fails loudly;
    static shapes (one image size per prepared image). `backend` is torch.compile's: the tests use "aot_eager" on
    CPU to check the capture (no graph break, no recompile) without inductor's C++ build time."""
    return CompiledUNetFeatures(uf, backend)


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
