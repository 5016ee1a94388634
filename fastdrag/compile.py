"""The only place that calls torch.compile or captures CUDA graphs."""

from __future__ import annotations

import contextlib

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

    def forward(self, z: torch.Tensor, t, c: torch.Tensor, with_eps: bool = True):
        # with_eps is a Python bool: the truncated pass (False) is its own graph, compiled at its first call
        return (self.compiled if torch.is_grad_enabled() else self.eager)(z, t, c, with_eps=with_eps)

    def close(self):
        self.eager.close()


def compile_unet_features(uf: UNetFeatures, backend: str = "inductor") -> CompiledUNetFeatures:
    """torch.compile the UNet pass that returns (eps, feature). fullgraph so that a graph break fails loudly;
    static shapes (one image size per prepared image). `backend` is torch.compile's: the tests use "aot_eager" on
    CPU to check the capture (no graph break, no recompile) without inductor's C++ build time."""
    return CompiledUNetFeatures(uf, backend)


@contextlib.contextmanager
def graph_warmup(on: bool, device: torch.device):
    """Run the enclosed work (the eager warm-up iterations, the capture and the replays) on a side stream, as CUDA
    graph capture requires of the iterations before it; a no-op unless `on` and `device` is a CUDA device."""
    if not on or device.type != "cuda":
        yield
        return
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def capture_graph(step, pool=None) -> "torch.cuda.CUDAGraph":
    """Capture one call of `step` (work that reads and writes only tensors that outlive it: for a drag iteration
    the latent, the Adam moments, the handles, the stop flag, the record buffers) into a CUDA graph. The step must
    already have run eagerly (compiled kernels built, lazy buffers allocated). Capturing does not run the step:
    replay() does. Graphs given the same `pool` share one memory pool (graphs replayed one after another)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


class GraphedCall:
    """A function of tensors replayed from CUDA graphs: the same work at every step with new values in the same
    tensors (a LoRA training step; an inversion or denoising UNet pass).

    One graph per `key`, the caller's name for what changes the computation besides the tensor values (the
    denoiser's mutual attention, on or off). Per key, the first call runs eagerly (the warm-up) and the second
    captures. Arguments are copied into the graph's input buffers; the result is the graph's output tensor, which
    the next replay overwrites: use it (or copy it) before the next call. Call inside graph_warmup(True, device)."""

    def __init__(self, fn):
        self.fn = fn
        self.warm: set = set()
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None

    def __call__(self, key, *args: torch.Tensor):
        if key not in self.graphs:
            if key not in self.warm:
                self.warm.add(key)
                return self.fn(*args)
            inputs = [a.clone() for a in args]
            outputs: dict = {}

            def body():
                outputs["out"] = self.fn(*inputs)

            self.graphs[key] = (capture_graph(body, self.pool), inputs, outputs)
        graph, inputs, outputs = self.graphs[key]
        for buf, a in zip(inputs, args):
            buf.copy_(a)
        graph.replay()
        return outputs["out"]


@contextlib.contextmanager
def merged_lora(unet, on: bool = True):
    """Fold the active LoRA into the base weights for the duration of the block: every adapted projection's weight
    becomes W + scale * B @ A (summed in fp32, stored in W's dtype) and its adapter branch is skipped, so a forward
    costs one matmul per projection instead of three. On exit the original weight tensors are put back, bit for
    bit: nothing is subtracted, so bf16 weights do not drift over thousands of edits. Yields the number of merged
    layers (0 with `on` False, with adapters disabled, or without any)."""
    from peft.tuners.lora import LoraLayer

    saved = []
    if on:
        for m in unet.modules():
            if not isinstance(m, LoraLayer) or m.disable_adapters or m.merged:
                continue
            base = m.get_base_layer()
            if not isinstance(base, torch.nn.Linear):
                raise TypeError(f"merged_lora handles LoRA on nn.Linear only, got {type(base).__name__}")
            active = [a for a in m.active_adapters if a in m.lora_A]
            if not active:
                continue
            w = base.weight
            delta = sum(m.lora_B[a].weight.float() @ m.lora_A[a].weight.float() * m.scaling[a] for a in active)
            saved.append((m, w.data, list(m.merged_adapters)))
            w.data = (w.data.float() + delta).to(w.dtype)
            m.merged_adapters.extend(active)
    try:
        yield len(saved)
    finally:
        for m, data, merged in reversed(saved):
            m.get_base_layer().weight.data = data
            m.merged_adapters[:] = merged
