"""The fast path on a CUDA device (issue 7): bf16 + the compiled UNet pass + the Triton kernels. On a GPU machine:

    TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 python -m pytest -q tests/test_kernels.py tests/test_gpu.py   # or: bash benchmarks/gpu_session.sh tests

tests/conftest.py defaults TRITON_INTERPRET to 1 so that the CPU suite runs the kernels in Triton's interpreter.
Under it every Triton kernel (ours, and the ones torch.compile's inductor generates for the UNet pass) would be
interpreted instead of run on the GPU, so these tests skip unless it is explicitly 0 (or unset before conftest runs).
The CPU counterparts of these checks are in tests/test_fast_path.py.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

import fastdrag
from fastdrag.api import resolve_execution
from fastdrag.kernels import reference as ref_ops

from .conftest import smooth_image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 (tests/conftest.py's default for the CPU suite) would run the Triton "
                              "kernels in the interpreter, not on the GPU: run with TRITON_INTERPRET=0"),
]

REACH = [((40, 60), (56, 70))]  # reaches its target mid-run on the tiny model (tests/test_fast_path.py)
QUICK = dict(lora_steps=2, n_inference_step=20)


@pytest.fixture(scope="module")
def cuda_model():
    return fastdrag.load_model("tiny", device="cuda")


@pytest.fixture(autouse=True)
def _triton_on(monkeypatch):
    monkeypatch.delenv("FASTDRAG_DISABLE_TRITON", raising=False)  # the kill switch is read at call time


def _mean_diff(a, b) -> float:
    return float(np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int)).mean())


def test_fast_backend_on_cuda_follows_the_reference(cuda_model):
    """backend="fast" (auto: bf16 + compiled UNet pass + Triton ops) against the reference loop, fp32 and bf16, on the
    same image and LoRA. bf16 alone moves the tiny random model's image a lot (mean ~10 levels of 255 against fp32
    on the CPU, with no drag at all) and may make tracking pick a neighbouring pixel, so the trajectories are not
    compared step by step. Asserted: every run moves the handle towards the target; the fast run ends within 3
    supervision-grid px (6 image px) of both references; its image is within a mean of 6 levels of the bf16
    reference (on the CPU the bf16 kernels alone give ~2) and no further from the fp32 image than 1.5x the bf16
    reference's own distance + 2 levels."""
    image = smooth_image()
    assert tuple(resolve_execution(fastdrag.make_config("dragdiffusion", backend="fast"), cuda_model)) == \
        ("fast", torch.bfloat16, True, True, True, True)
    ed = fastdrag.Editor(cuda_model)
    kw = dict(n_pix_step=30, **QUICK)
    try:
        ref32 = ed.edit(image, REACH, backend="reference", precision="fp32", compile_unet="off", **kw)
        ref16 = ed.edit(image, REACH, backend="reference", precision="bf16", compile_unet="off", **kw)
        fast = ed.edit(image, REACH, backend="fast", **kw)
        assert cuda_model.dtype == torch.bfloat16 and len(ed._compiled) == 1
        (hx, hy), (tx, ty) = REACH[0]
        start = np.hypot(tx - hx, ty - hy)
        for r in (ref32, ref16, fast):
            assert r.trace["steps"] > 0 and torch.isfinite(r.trace["z_dragged"]).all()
            (x, y), = r.points
            assert np.hypot(tx - x, ty - y) < start - 4, r.points  # moved towards the target
        (fx, fy), = fast.points
        for r in (ref32, ref16):
            (x, y), = r.points
            assert np.hypot(x - fx, y - fy) <= 6, (r.points, fast.points)
        d16, d32, floor = _mean_diff(fast, ref16), _mean_diff(fast, ref32), _mean_diff(ref16, ref32)
        assert d16 < 6, (d16, d32, floor)
        assert d32 < 1.5 * floor + 2, (d16, d32, floor)
    finally:
        for compiled in ed._compiled.values():
            compiled.close()
        cuda_model.to(dtype=torch.float32)


def _points(gen: torch.Generator, n: int, size: int = 128):
    pts = []
    for _ in range(n):
        h = torch.randint(16, size - 16, (2,), generator=gen)
        d = torch.randint(4, 12, (2,), generator=gen) * (torch.randint(0, 2, (2,), generator=gen) * 2 - 1)
        t = (h + d).clamp(0, size - 1)
        pts.append(((float(h[0]), float(h[1])), (float(t[0]), float(t[1]))))
    return pts


def test_no_recompiles_across_20_drags(cuda_model):
    """One compiled graph serves every drag of the image: other points, one or two pairs, another stop step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    image = smooth_image()
    ed = fastdrag.Editor(cuda_model)
    kw = dict(backend="fast", compile_unet="on", n_pix_step=6, lora_steps=1, n_inference_step=10)
    try:
        ed.edit(image, REACH, **kw)  # compiles the UNet pass
        assert counters["stats"]["unique_graphs"] == 1
        gen = torch.Generator().manual_seed(0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(20):
                r = ed.edit(image, _points(gen, 1 + i % 2), check_every=1 + i % 3, **kw)
                assert torch.isfinite(r.trace["z_dragged"]).all()
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        for compiled in ed._compiled.values():
            compiled.close()
        torch._dynamo.reset()
        cuda_model.to(dtype=torch.float32)


def test_fast_ops_take_the_cuda_kernels(cuda_model, monkeypatch):
    """A CLIPDrag edit with backend="fast" runs every op (patch sampling, fused patch L1 and its backward, tracking,
    gradient fusion) as a Triton kernel on the GPU: the plain-PyTorch fallbacks are never called, and the kernels
    show up in the CUDA profile."""
    dispatch = importlib.import_module("fastdrag.kernels._dispatch")
    assert not dispatch.INTERPRET
    assert dispatch.use_triton(torch.zeros(1, device="cuda"))
    fallbacks = []

    def recording(name, real):
        def fallback(*args, **kwargs):
            fallbacks.append(name)
            return real(*args, **kwargs)
        return fallback

    for name in ("sample_patches", "patch_l1", "track", "fuse_gradients"):
        monkeypatch.setattr(ref_ops, name, recording(name, getattr(ref_ops, name)))
    image = smooth_image()
    ed = fastdrag.Editor(cuda_model)
    kw = dict(method="clipdrag", clip_model="tiny", edit_prompt="a photo", backend="fast", compile_unet="off",
              n_pix_step=5, **QUICK)
    ed.edit(image, REACH, **kw)  # warm-up: LoRA, inversion, Triton JIT
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        r = ed.edit(image, REACH, **kw)
        torch.cuda.synchronize()
    cuda_model.to(dtype=torch.float32)
    assert r.trace["steps"] > 0
    assert fallbacks == []
    names = {e.key for e in prof.key_averages()}
    for kernel in ("_patch_fwd_kernel", "_patch_bwd_kernel", "_track_dist_kernel", "_track_select_kernel", "_fuse_"):
        assert any(kernel in n for n in names), (kernel, sorted(n for n in names if "kernel" in n))


@pytest.mark.parametrize("method", ["dragdiffusion", "dragtext", "clipdrag"])
def test_captured_drag_step_matches_the_eager_step(cuda_model, method):
    """cuda_graph="on" (iterations 0-1 eager, then one captured iteration replayed) against the same fast path
    without capture: the same kernels on the same inputs, so the same handle trajectory and step count, and latents
    equal up to bf16 rounding. The FAR pair never reaches its target (every step is a replay); REACH stops mid-run
    with the flag read every 4 steps (masked replays after the stop). The CPU side of this check (no host read in the
    captured iteration, state kept in place) is tests/test_fast_path.py::test_graph_path_matches_the_eager_loop..."""
    image = smooth_image()
    extra = dict(clip_model="tiny", edit_prompt="a photo") if method == "clipdrag" else {}
    ed = fastdrag.Editor(cuda_model)
    try:
        for points, n, k in (([((30, 40), (60, 80))], 12, 1), (REACH, 30, 4)):
            kw = dict(method=method, backend="fast", n_pix_step=n, check_every=k, **QUICK, **extra)
            eager = ed.edit(image, points, cuda_graph="off", **kw)
            graphed = ed.edit(image, points, cuda_graph="on", **kw)
            assert graphed.trace["cuda_graph"] is True and eager.trace["cuda_graph"] is False
            assert graphed.trace["steps"] == eager.trace["steps"] > 2
            assert torch.equal(graphed.trace["handles"], eager.trace["handles"])
            torch.testing.assert_close(graphed.trace["z_dragged"], eager.trace["z_dragged"], rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(graphed.trace["ms_loss"], eager.trace["ms_loss"], rtol=1e-2, atol=1e-3)
            assert _mean_diff(graphed, eager) < 1.0
    finally:
        for compiled in ed._compiled.values():
            compiled.close()
        cuda_model.to(dtype=torch.float32)


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_stage_graphs_match_the_eager_stages_on_cuda(cuda_model, method):
    """cuda_graph_stages="on" against "off" (both otherwise the fast default): the LoRA fit, inversion and denoising
    replayed from CUDA graphs give the same image up to bf16 noise and handles within 2 px. Fresh Editors, so that
    each fits and inverts."""
    image = smooth_image()
    steps = dict(drag_end_step=2) if method == "gooddrag" else dict(n_pix_step=8)
    kw = dict(method=method, backend="fast", compile_unet="off", start_step=2, **steps, **QUICK)
    try:
        eager = fastdrag.Editor(cuda_model).edit(image, REACH, cuda_graph_stages="off", **kw)
        graphed = fastdrag.Editor(cuda_model).edit(image, REACH, cuda_graph_stages="on", **kw)
        assert _mean_diff(graphed, eager) < 1.0
        (ex, ey), = eager.points
        (gx, gy), = graphed.points
        assert np.hypot(ex - gx, ey - gy) <= 2
    finally:
        cuda_model.to(dtype=torch.float32)
