"""Triton kernels (fastdrag.kernels) against the plain-PyTorch references (fastdrag.kernels.reference).

Runs in CI under TRITON_INTERPRET=1 (tests/conftest.py sets it) on CPU tensors, and on CUDA tensors when a
GPU is present and the interpreter is off (`TRITON_INTERPRET=0 pytest tests/test_kernels.py`). The
interpreter costs a few ms per Triton program, so maps are tiny (C <= 37, 7x9 maps, 13x17 upsamples) and
the grids are a chosen subset that still covers radius 0/1/4/12, N = 1...8, every dtype, fractional
centers and centers on and beyond the border.

Every kernel output is allocated poisoned (FASTDRAG_POISON=1 -> NaN), so an element a kernel fails to
write cannot match the reference.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdrag.kernels as K
from fastdrag.kernels import reference
from fastdrag.kernels._dispatch import INTERPRET

interp_mod = importlib.import_module("fastdrag.kernels.interp")
track_mod = importlib.import_module("fastdrag.kernels.track")  # `K.track` is the op, not the module
fuse_mod = importlib.import_module("fastdrag.kernels.fuse")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
TRITON_RUNS = INTERPRET or HAS_CUDA
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
needs_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU with TRITON_INTERPRET unset")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DT_ID = {F32: "fp32", BF16: "bf16", F16: "fp16"}

# (atol, rtol) of a kernel run on `dtype` inputs against the float32 reference on the same values upcast.
# The kernels compute in fp32 and round once, on store, to the output dtype:
# - fp32: same math in another association order: a few ulps of O(1) values.
# - fp16: one rounding, half an ulp = 2^-11 relative, plus fp32 noise; 2e-3 leaves 4x margin.
# - bf16: one rounding, 2^-9 relative on a GPU (round to nearest); the CPU interpreter truncates on the
#   fp32->bf16 cast (up to 2^-8 relative). 2e-2 leaves margin for O(4) values.
TOL = {F32: (2e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (2e-2, 2e-2)}
# Gradients add up to (2r+1)^2 * 16 contributions per pixel in fp32, in another order than autograd:
# fp32 gets a looser absolute bound; the low-precision bounds (one final rounding) are unchanged.
TOL_GRAD = {F32: (1e-4, 1e-5), F16: (2e-3, 2e-3), BF16: (2e-2, 2e-2)}


@pytest.fixture(autouse=True)
def _kernel_env(monkeypatch):
    monkeypatch.setenv("FASTDRAG_POISON", "1")
    monkeypatch.delenv("FASTDRAG_DISABLE_TRITON", raising=False)


def _close(actual, expected, tol, what=""):
    assert not torch.isnan(actual).any(), f"{what}: NaN in the output (unwritten poisoned element?)"
    atol, rtol = tol
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _centers(n: int, H2: int, W2: int, gen: torch.Generator) -> torch.Tensor:
    """n fractional (row, col) centers: beyond the border first, then on it, then random (some outside)."""
    special = torch.tensor([
        [-2.5, W2 + 1.25],        # beyond two borders
        [0.0, 0.0],               # exactly on the corner
        [H2 - 1.0, W2 - 1.0],     # exactly on the far corner
        [H2 / 2 + 0.5, 1.0],      # interior, half-pixel row, integer col
        [H2 - 0.75, -0.3],        # just outside the near column
    ])
    rand = torch.rand(max(n - len(special), 0), 2, generator=gen) * torch.tensor([H2 + 5.0, W2 + 5.0]) - 2.5
    return torch.cat([special, rand])[:n].to(DEVICE)


def _map(C, h, w, dtype, gen):
    return torch.randn(C, h, w, generator=gen).to(device=DEVICE, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# sample_patches / patch_l1
# ----------------------------------------------------------------------------------------------------
# (dtype, radius, N, out_size): every fp32 combination of radius {1, 4, 12} x N {1, 8} x {no upsample,
# 7x9 -> 13x17 upsample}, plus radius 0, a downsample, and a spread of the low-precision dtypes.
UP = (13, 17)
PATCH_CASES = [(F32, r, n, up) for r in (1, 4, 12) for n in (1, 8) for up in (None, UP)] + [
    (F32, 0, 5, UP), (F32, 2, 3, (5, 6)),
    (BF16, 1, 8, UP), (BF16, 4, 3, None), (BF16, 12, 1, UP), (BF16, 0, 2, UP),
    (F16, 1, 2, None), (F16, 4, 8, UP), (F16, 12, 4, None),
]


def _pid(case):
    dt, r, n, up = case
    return f"{DT_ID[dt]}-r{r}-N{n}-" + ("same" if up is None else f"up{up[0]}x{up[1]}")


def _patch_inputs(case, seed: int):
    """(gen, feat [5, 7, 9], centers [n, 2] on the sampled grid, patch side k) of a PATCH_CASES case."""
    dtype, radius, n, out_size = case
    gen = torch.Generator().manual_seed(seed + radius * 10 + n)
    C, h, w = 5, 7, 9
    H2, W2 = out_size or (h, w)
    return gen, _map(C, h, w, dtype, gen), _centers(n, H2, W2, gen), 2 * radius + 1


@needs_triton
@pytest.mark.parametrize("case", PATCH_CASES, ids=_pid)
def test_sample_patches_forward_backward(case):
    dtype, radius, n, out_size = case
    gen, feat, centers, k = _patch_inputs(case, 1000)
    C = feat.shape[0]

    x = feat.clone().requires_grad_()
    out = K.sample_patches(x, centers, radius, out_size=out_size)
    assert out.shape == (n, C, k, k) and out.dtype == dtype
    x32 = feat.float().requires_grad_()
    exp = reference.sample_patches(x32, centers, radius, out_size=out_size)
    _close(out, exp, TOL[dtype], "forward")

    grad = torch.randn(n, C, k, k, generator=gen).to(device=DEVICE, dtype=dtype)  # shared upstream grad
    out.backward(grad)
    exp.backward(grad.float())
    assert x.grad.dtype == dtype
    _close(x.grad, x32.grad, TOL_GRAD[dtype], "backward")


@needs_triton
@pytest.mark.parametrize("case", PATCH_CASES, ids=_pid)
def test_patch_l1_forward_backward(case):
    dtype, radius, n, out_size = case
    gen, feat, centers, k = _patch_inputs(case, 2000)
    # Reference patches at least 0.1 away from the sample, on a random side: |ref - S| has no kink within
    # rounding distance, so sign(ref - S) (the gradient) is the same for the kernel and the fp32 reference.
    base = reference.sample_patches(feat.float(), centers, radius, out_size=out_size)
    sign = torch.randint(0, 2, base.shape, generator=gen).to(DEVICE) * 2 - 1
    ref = base + sign * (0.1 + torch.rand(base.shape, generator=gen).to(DEVICE))

    x = feat.clone().requires_grad_()
    loss = K.patch_l1(x, ref, centers, radius, out_size=out_size)
    assert loss.shape == (n,) and loss.dtype == torch.float32
    x32 = feat.float().requires_grad_()
    exp = reference.patch_l1(x32, ref, centers, radius, out_size=out_size)
    _close(loss, exp, TOL[dtype], "forward")

    gl = torch.randn(n, generator=gen).to(DEVICE)
    loss.backward(gl)
    exp.backward(gl)
    _close(x.grad, x32.grad, TOL_GRAD[dtype], "backward")


@needs_triton
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DT_ID.get)
def test_patch_l1_of_own_patch_is_exactly_zero(dtype):
    """ref = the op's own sample -> loss 0 and gradient 0 (sign(0) = 0), as at the reference's first step."""
    gen = torch.Generator().manual_seed(7)
    feat = _map(4, 7, 9, dtype, gen)
    centers = _centers(3, *UP, gen)
    ref = K.sample_patches(feat, centers, 2, out_size=UP)
    x = feat.clone().requires_grad_()
    loss = K.patch_l1(x, ref, centers, 2, out_size=UP)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


@needs_triton
def test_patches_many_channel_blocks(monkeypatch):
    """Small tiles so that C = 37 spans several channel blocks (and the L1 partials several slots)."""
    monkeypatch.setattr(interp_mod, "_TILE_ELEMS", 64)
    gen = torch.Generator().manual_seed(3)
    feat = _map(37, 7, 9, F32, gen)
    centers = _centers(3, *UP, gen)
    x = feat.clone().requires_grad_()
    out = K.sample_patches(x, centers, 1, out_size=UP)
    x32 = feat.clone().requires_grad_()
    exp = reference.sample_patches(x32, centers, 1, out_size=UP)
    _close(out, exp, TOL[F32], "forward")
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(grad)
    exp.backward(grad)
    _close(x.grad, x32.grad, TOL_GRAD[F32], "backward")
    ref = exp.detach() + 0.5
    _close(K.patch_l1(feat, ref, centers, 1, out_size=UP), reference.patch_l1(feat, ref, centers, 1, out_size=UP),
           TOL[F32], "patch_l1")


@needs_triton
def test_gpu_tile_rules(monkeypatch):
    """The GPU's tile choice, run by the interpreter: the upsampled backward on half the forward's tile and
    the upsampled tracking pass on half its plain tile (benchmarks/compile_sm90.py says why), several channel
    blocks each on a 37-channel map."""
    monkeypatch.setattr(interp_mod, "INTERPRET", False)
    monkeypatch.setattr(track_mod, "INTERPRET", False)
    monkeypatch.setattr(interp_mod, "_TILE_ELEMS", 128)
    monkeypatch.setattr(track_mod, "_TRACK_TILE_ELEMS", 512)
    monkeypatch.setattr(track_mod, "_TARGET_PROGRAMS", 16)
    assert interp_mod._bwd_tile_elems(UP) == 64 and interp_mod._bwd_tile_elems(None) == 128
    assert track_mod._track_tile_elems(UP) == 256 and track_mod._track_tile_elems(None) == 512
    gen = torch.Generator().manual_seed(5)
    feat = _map(37, 7, 9, F32, gen)
    centers = _centers(3, *UP, gen)
    x, x32 = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    out = K.sample_patches(x, centers, 1, out_size=UP)
    exp = reference.sample_patches(x32, centers, 1, out_size=UP)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(grad)
    exp.backward(grad)
    _close(x.grad, x32.grad, TOL_GRAD[F32], "sample_patches backward")
    ref = exp.detach() + 0.5
    x, x32 = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    K.patch_l1(x, ref, centers, 1, out_size=UP).sum().backward()
    reference.patch_l1(x32, ref, centers, 1, out_size=UP).sum().backward()
    _close(x.grad, x32.grad, TOL_GRAD[F32], "patch_l1 backward")
    handles, targets = _handles(6, *UP, gen)
    f0 = torch.randn(6, 37, generator=gen).to(DEVICE)
    assert torch.equal(K.track(feat, f0, handles, targets, 3, out_size=UP),
                       reference.track(feat, f0, handles, targets, 3, out_size=UP))


@needs_triton
def test_out_size_equal_to_map_is_no_upsample():
    gen = torch.Generator().manual_seed(4)
    feat = _map(3, 7, 9, F32, gen)
    centers = _centers(4, 7, 9, gen)
    assert torch.equal(K.sample_patches(feat, centers, 2, out_size=(7, 9)), K.sample_patches(feat, centers, 2))


# ----------------------------------------------------------------------------------------------------
# track
# ----------------------------------------------------------------------------------------------------
TRACK_CASES = [(dt, r, up, co) for dt in (F32, BF16, F16) for r in (1, 3, 12) for up in (None, UP)
               for co in (False, True)]


def _tid(case):
    dt, r, up, co = case
    return f"{DT_ID[dt]}-r{r}-" + ("same" if up is None else "up") + ("-closer" if co else "")


def _handles(n, H2, W2, gen):
    """Handles/targets covering the stays-put rules, then random points (some off the map)."""
    special_h = torch.tensor([[-20.0, -20.0],   # window entirely off the map: stays put
                              [3.0, 4.0],       # at its target
                              [5.0, 5.0],       # |h - g|^2 = 1
                              [0.0, 0.0],       # corner
                              [2.5, 3.5]])      # rounds half to even -> (2, 4)
    special_g = torch.tensor([[5.0, 5.0], [3.0, 4.0], [5.0, 6.0], [H2 - 1.0, W2 - 1.0], [6.0, 0.0]])
    m = max(n - len(special_h), 0)
    rand_h = torch.stack([torch.randint(-2, H2 + 2, (m,), generator=gen),
                          torch.randint(-2, W2 + 2, (m,), generator=gen)], 1).float()
    rand_g = torch.stack([torch.randint(0, H2, (m,), generator=gen),
                          torch.randint(0, W2, (m,), generator=gen)], 1).float()
    return torch.cat([special_h, rand_h])[:n].to(DEVICE), torch.cat([special_g, rand_g])[:n].to(DEVICE)


@needs_triton
@pytest.mark.parametrize("case", TRACK_CASES, ids=_tid)
def test_track_matches_reference(case, monkeypatch):
    dtype, radius, out_size, closer = case
    # Several channel splits per handle even on a 37-channel map (the CPU default is one program each).
    monkeypatch.setattr(track_mod, "_TARGET_PROGRAMS", 16)
    gen = torch.Generator().manual_seed(3000 + radius)
    C, h, w = 37, 7, 9
    H2, W2 = out_size or (h, w)
    n = 8 if radius != 12 else 6
    feat = _map(C, h, w, dtype, gen)
    handles, targets = _handles(n, H2, W2, gen)
    ref = torch.randn(n, C, generator=gen).to(DEVICE)
    got = K.track(feat, ref, handles, targets, radius, out_size=out_size, closer_only=closer)
    exp = reference.track(feat, ref, handles, targets, radius, out_size=out_size, closer_only=closer)
    assert got.dtype == handles.dtype and got.shape == (n, 2)
    assert torch.equal(got, exp), f"\n{got.tolist()}\n{exp.tolist()}"


@needs_triton
@pytest.mark.parametrize("out_size", [None, (28, 36)], ids=["same", "up4x"])
@pytest.mark.parametrize("closer", [False, True], ids=["all", "closer"])
def test_track_ties_first_in_row_major(closer, out_size):
    """A constant map makes every candidate tie: the first valid window point (row-major) must win.

    Exact ties need exact resize weights: a 4x upsample (as 64 -> 256) has weights k/8, so the upsampled
    constant map is exactly constant; a 7 -> 13 resize would not be (fp32 weights need not sum to 1).
    """
    H2, W2 = out_size or (7, 9)
    feat = torch.ones(4, 7, 9, device=DEVICE)
    ref = torch.zeros(3, 4, device=DEVICE)
    handles = torch.tensor([[3.0, 4.0], [0.0, 0.0], [H2 - 1.0, W2 - 1.0]], device=DEVICE)
    targets = torch.tensor([[H2 - 1.0, W2 - 1.0], [H2 - 1.0, W2 - 1.0], [0.0, 0.0]], device=DEVICE)
    got = K.track(feat, ref, handles, targets, 2, out_size=out_size, closer_only=closer)
    exp = reference.track(feat, ref, handles, targets, 2, out_size=out_size, closer_only=closer)
    assert torch.equal(got, exp)
    if not closer:
        assert got.tolist() == [[1.0, 2.0], [0.0, 0.0], [H2 - 3.0, W2 - 3.0]]


@needs_triton
def test_track_single_handle_default_split():
    gen = torch.Generator().manual_seed(5)
    feat = _map(6, 7, 9, F32, gen)
    handles = torch.tensor([[4.0, 6.0]], device=DEVICE)
    q = torch.tensor([[6, 9]])  # plant the exact reference at an upsampled point in the window
    ref = reference.upsample(feat, UP)[:, q[0, 0], q[0, 1]][None].clone()
    got = K.track(feat, ref, handles, handles, 4, out_size=UP)
    assert got.tolist() == [[6.0, 9.0]]
    assert torch.equal(got, reference.track(feat, ref, handles, handles, 4, out_size=UP))


# ----------------------------------------------------------------------------------------------------
# fuse_gradients
# ----------------------------------------------------------------------------------------------------

def _grads(kind, shape, gen):
    gl = torch.randn(shape, generator=gen)
    gg = torch.randn(shape, generator=gen)
    if kind == "opposed":      # cos < 0
        gg = -2.0 * gl + 0.5 * gg
    elif kind == "aligned":    # cos > 0, far from 1
        gg = gl + gg
    elif kind == "zero_local":
        gl = torch.zeros(shape)
    elif kind == "zero_global":
        gg = torch.zeros(shape)
    elif kind == "both_zero":
        gl, gg = torch.zeros(shape), torch.zeros(shape)
    return gl, gg


FUSE_CASES = [(dt, rule, kind) for dt in (F32, BF16, F16) for rule in ("clipdrag", "projection")
              for kind in ("random", "opposed", "aligned", "zero_local", "zero_global", "both_zero")]


@needs_triton
@pytest.mark.parametrize("layout", ["single", "two_pass"])
@pytest.mark.parametrize("case", FUSE_CASES, ids=lambda c: f"{DT_ID[c[0]]}-{c[1]}-{c[2]}")
def test_fuse_gradients_matches_reference(case, layout, monkeypatch):
    dtype, rule, kind = case
    if layout == "two_pass":
        monkeypatch.setattr(fuse_mod, "_SINGLE_PROGRAM_MAX", 0)
    gen = torch.Generator().manual_seed(4000)
    gl, gg = _grads(kind, (4, 29, 31), gen)  # 3596 elements: 4 tiles, odd tail
    gl, gg = gl.to(device=DEVICE, dtype=dtype), gg.to(device=DEVICE, dtype=dtype)
    got = K.fuse_gradients(gl, gg, 0.7, rule=rule)
    exp = reference.fuse_gradients(gl, gg, 0.7, rule=rule)  # upcasts to fp32 itself
    assert got.shape == gl.shape and got.dtype == dtype
    # One rounding of an fp32 result: 1 ulp of the output dtype (the interpreter truncates bf16).
    _close(got, exp, TOL[dtype], rule)


@needs_triton
def test_fuse_gradients_mixed_dtypes_and_shapes():
    gen = torch.Generator().manual_seed(6)
    gl = torch.randn(4, 13, 17, generator=gen).to(DEVICE, BF16)
    gg = torch.randn(4 * 13 * 17, generator=gen).to(DEVICE)  # same numel, other shape and dtype
    got = K.fuse_gradients(gl, gg, 2.0, rule="projection")
    assert got.shape == gl.shape and got.dtype == BF16
    _close(got, reference.fuse_gradients(gl, gg, 2.0, rule="projection"), TOL[BF16], "mixed")


@needs_triton
def test_fuse_gradients_parallel_is_ill_conditioned_but_bounded():
    """cos = 1 up to rounding: sin = sqrt(1 - cos^2) amplifies an ulp of cos to ~3e-4, so compare loosely."""
    gen = torch.Generator().manual_seed(8)
    gl = torch.randn(4, 13, 17, generator=gen).to(DEVICE)
    got = K.fuse_gradients(gl, 3 * gl, 0.5)
    _close(got, reference.fuse_gradients(gl, 3 * gl, 0.5), (5e-3, 0), "parallel")


# ----------------------------------------------------------------------------------------------------
# dispatch, kill switch, torch.library registration
# ----------------------------------------------------------------------------------------------------

def _run_all_ops():
    gen = torch.Generator().manual_seed(9)
    feat = _map(3, 7, 9, F32, gen).requires_grad_()
    centers = _centers(2, *UP, gen)
    p = K.sample_patches(feat, centers, 1, out_size=UP)
    p.sum().backward()
    K.patch_l1(feat, p.detach() + 1, centers, 1, out_size=UP).sum().backward()
    K.track(feat, torch.zeros(2, 3, device=DEVICE), centers.round(), centers.round(), 1, out_size=UP)
    K.fuse_gradients(torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE), 0.5)


def _spy(monkeypatch, targets):
    """Wrap each (module, function name) so that its calls are recorded by name; returns the record."""
    calls = []
    for mod, name in targets:
        orig = getattr(mod, name)

        def spy(*a, __orig=orig, __name=name, **kw):
            calls.append(__name)
            return __orig(*a, **kw)

        monkeypatch.setattr(mod, name, spy)
    return calls


def _spy_reference(monkeypatch):
    return _spy(monkeypatch, [(reference, n) for n in ("sample_patches", "patch_l1", "track", "fuse_gradients")])


def _spy_triton(monkeypatch):
    return _spy(monkeypatch, [(interp_mod, "_launch"), (track_mod, "_track_triton"), (fuse_mod, "_fuse_triton")])


def test_kill_switch_takes_reference(monkeypatch):
    monkeypatch.setenv("FASTDRAG_DISABLE_TRITON", "1")
    ref_calls, triton_calls = _spy_reference(monkeypatch), _spy_triton(monkeypatch)
    _run_all_ops()
    assert triton_calls == []
    assert {"sample_patches", "patch_l1", "track", "fuse_gradients"} <= set(ref_calls)


@needs_triton
def test_triton_path_is_taken(monkeypatch):
    ref_calls, triton_calls = _spy_reference(monkeypatch), _spy_triton(monkeypatch)
    _run_all_ops()
    assert ref_calls == []
    assert {"_launch", "_track_triton", "_fuse_triton"} <= set(triton_calls)


def test_float64_takes_reference(monkeypatch):
    ref_calls, triton_calls = _spy_reference(monkeypatch), _spy_triton(monkeypatch)
    feat = torch.randn(2, 5, 6, dtype=torch.float64, device=DEVICE)
    K.sample_patches(feat, torch.tensor([[1.5, 2.0]], device=DEVICE), 1)
    assert triton_calls == [] and ref_calls == ["sample_patches"]


def test_ops_are_registered():
    for name in ("sample_patches", "sample_patches_backward", "patch_l1", "patch_l1_backward", "track",
                 "fuse_gradients"):
        assert hasattr(torch.ops.fastdrag, name), name
    feat = torch.randn(2, 5, 6, device=DEVICE)
    out = torch.ops.fastdrag.sample_patches(feat, torch.tensor([[1.0, 2.0]], device=DEVICE), 1, None)
    assert out.shape == (1, 2, 3, 3)


def _opcheck_args():
    gen = torch.Generator().manual_seed(10)
    feat = _map(3, 7, 9, F32, gen)
    centers = _centers(2, *UP, gen)
    ref = reference.sample_patches(feat, centers, 1, out_size=list(UP)) + 0.25
    f0 = torch.randn(2, 3, generator=gen).to(DEVICE)
    hs = torch.tensor([[3.0, 4.0], [10.0, 2.0]], device=DEVICE)
    return [
        (torch.ops.fastdrag.sample_patches.default, (feat.clone().requires_grad_(), centers, 1, list(UP))),
        (torch.ops.fastdrag.patch_l1.default, (feat.clone().requires_grad_(), ref, centers, 1, list(UP))),
        (torch.ops.fastdrag.track.default, (feat, f0, hs, hs.flip(0), 2, list(UP), True)),
        (torch.ops.fastdrag.fuse_gradients.default, (torch.randn(3, 4, device=DEVICE),
                                                     torch.randn(3, 4, device=DEVICE), 0.5, "clipdrag")),
    ]


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_opcheck(path, monkeypatch):
    """torch.library.opcheck: schema, fake (meta) implementations, autograd registration, AOT dispatch."""
    if path == "reference":
        monkeypatch.setenv("FASTDRAG_DISABLE_TRITON", "1")
    elif not TRITON_RUNS:
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    for op, args in _opcheck_args():
        torch.library.opcheck(op, args)


def test_compile_fullgraph_aot_eager():
    """Dynamo traces the public wrappers into one graph around the custom ops (no GPU or Inductor needed)."""
    import torch._dynamo

    def step(feat, ref, centers, f0, handles, targets, gl, gg):
        loss = K.patch_l1(feat, ref, centers, 1, out_size=UP).sum()
        patches = K.sample_patches(feat, centers, 2, out_size=UP)
        new = K.track(feat, f0, handles, targets, 3, out_size=UP, closer_only=True)
        return loss, patches, new, K.fuse_gradients(gl, gg, 0.5, rule="projection")

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(12)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            feat = _map(3, 7, 9, F32, gen).requires_grad_()
            centers = _centers(2, *UP, gen)
            ref = reference.sample_patches(feat.detach(), centers + 0.5, 1, out_size=UP)
            handles, targets = _handles(2, *UP, gen)
            f0, gl, gg = (torch.randn(s, generator=gen).to(DEVICE) for s in ((2, 3), (4, 5), (4, 5)))
            got = compiled(feat, ref, centers, f0, handles, targets, gl, gg)
            exp = step(feat, ref, centers, f0, handles, targets, gl, gg)
            for a, b in zip(got, exp):
                torch.testing.assert_close(a, b)
            torch.testing.assert_close(torch.autograd.grad(got[0], feat)[0], torch.autograd.grad(exp[0], feat)[0])
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# GPU only: real sizes, torch.compile, CUDA graphs
# ----------------------------------------------------------------------------------------------------

def _real_inputs(dtype=BF16, n=10):
    gen = torch.Generator(device="cuda").manual_seed(11)
    feat = torch.randn(640, 64, 64, device="cuda", generator=gen).to(dtype)
    centers = torch.rand(n, 2, device="cuda", generator=gen) * 270 - 7
    handles = centers.round()
    targets = (torch.rand(n, 2, device="cuda", generator=gen) * 256).round()
    f0 = torch.randn(n, 640, device="cuda", generator=gen)
    gl = torch.randn(4, 64, 64, device="cuda", generator=gen)
    gg = torch.randn(4, 64, 64, device="cuda", generator=gen)
    return feat, centers, handles, targets, f0, gl, gg


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_ID.get)
def test_real_sizes_match_reference(dtype):
    feat, centers, handles, targets, f0, gl, gg = _real_inputs(dtype)
    osz = (256, 256)
    for r in (1, 4):
        _close(K.sample_patches(feat, centers, r, out_size=osz),
               reference.sample_patches(feat.float(), centers, r, out_size=osz), TOL[dtype], f"patches r={r}")
    fmap = reference.upsample(feat, osz).float()
    for r in (3, 12):
        for co in (False, True):
            got = K.track(feat, f0, handles, targets, r, out_size=osz, closer_only=co)
            exp = reference.track(feat, f0, handles, targets, r, out_size=osz, closer_only=co)
            # The kernel's upsampled value may differ from ATen's by an ulp (FMA, association): only a
            # near-tie can then pick another point, so accept a different point only at the same distance.
            for i in (~(got == exp).all(1)).nonzero().flatten().tolist():
                d = [(f0[i].float() - fmap[:, int(p[i, 0]), int(p[i, 1])]).abs().sum() for p in (got, exp)]
                torch.testing.assert_close(d[0], d[1], atol=0, rtol=TOL[dtype][1], msg=f"track r={r} point {i}")
    _close(K.fuse_gradients(gl, gg, 0.3), reference.fuse_gradients(gl, gg, 0.3), TOL[F32], "fuse")


@pytest.mark.gpu
@needs_gpu
def test_compile_fullgraph_no_recompiles():
    import torch._dynamo

    osz = (256, 256)

    def step(feat, ref, centers, f0, handles, targets, gl, gg):
        loss = K.patch_l1(feat, ref, centers, 1, out_size=osz).sum()
        patches = K.sample_patches(feat, centers, 4, out_size=osz)
        new = K.track(feat, f0, handles, targets, 3, out_size=osz, closer_only=True)
        fused = K.fuse_gradients(gl, gg, 0.5)
        return loss, patches, new, fused

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3):
            feat, centers, handles, targets, f0, gl, gg = _real_inputs(F32)
            feat = (feat + i).requires_grad_()
            ref = reference.sample_patches(feat.detach(), centers + 0.5, 1, out_size=osz)
            got = compiled(feat, ref, centers, f0, handles, targets, gl, gg)
            (g_got,) = torch.autograd.grad(got[0], feat)
            exp = step(feat, ref, centers, f0, handles, targets, gl, gg)
            (g_exp,) = torch.autograd.grad(exp[0], feat)
            for a, b in zip(got, exp):
                torch.testing.assert_close(a, b)
            torch.testing.assert_close(g_got, g_exp)


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_capture():
    feat, centers, handles, targets, f0, gl, gg = _real_inputs(BF16)
    osz = (256, 256)
    ref = K.sample_patches(feat, centers + 0.5, 1, out_size=osz)

    def run():
        return (K.sample_patches(feat, centers, 4, out_size=osz), K.patch_l1(feat, ref, centers, 1, out_size=osz),
                K.track(feat, f0, handles, targets, 12, out_size=osz), K.fuse_gradients(gl, gg, 0.5))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (JIT compile) outside the capture
        expected = run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------
# Cross-compilation for sm_90 (no GPU needed): the interpreter accepts some code the compiler rejects
# ----------------------------------------------------------------------------------------------------

ALL_KERNELS = {"_patch_fwd_kernel", "_patch_bwd_kernel", "_track_dist_kernel", "_track_select_kernel",
               "_fuse_single_kernel", "_fuse_reduce_kernel", "_fuse_combine_kernel"}


@pytest.mark.slow
def test_every_launch_compiles_for_sm90_without_spills(tmp_path):
    """benchmarks.compile_sm90 records every launch the ops make (benchmark sizes and small odd shapes, each
    dtype, forward and backward) and builds each for the H100 with Triton's own ptxas. A launch that does not
    compile, needs more shared memory or registers than sm_90 has, or spills registers, fails the test.
    (Under Triton 3.6 it failed on the upsampled backward and tracking tiles until they were halved.)"""
    out = tmp_path / "sm90.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.compile_sm90", "--json", str(out)], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=1200)
    if not out.exists() and ("ptxas" in res.stderr or "GPUTarget" in res.stderr
                             or "No module named 'triton.compiler'" in res.stderr):
        pytest.skip(f"Triton cannot cross-compile here: {res.stderr.strip().splitlines()[-1]}")
    assert out.exists(), res.stdout[-2000:] + res.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["name"] for r in rows} == ALL_KERNELS
    # every map dtype reached the patch and tracking kernels, on both grids (plain and upsampled)
    for name in ("_patch_fwd_kernel", "_patch_bwd_kernel", "_track_dist_kernel"):
        seen = {(r["signature"]["feat_ptr"], r["constexprs"]["TAPS"]) for r in rows if r["name"] == name}
        assert seen == {(p, t) for p in ("*fp32", "*bf16", "*fp16") for t in (2, 4)}, (name, seen)
    bad = {r["kernel"]: r["problems"] for r in rows if r["problems"]}
    assert not bad, bad
    assert all(r["registers"] for r in rows), "ptxas -v gave no register count"
    assert res.returncode == 0, res.stderr[-4000:]


# ----------------------------------------------------------------------------------------------------
# benchmarks/kernels.py: its cases and report, run on small sizes (the timings are stubbed: no GPU here)
# ----------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernel_benchmark_script_runs_on_small_sizes(monkeypatch, tmp_path, capsys, dtype):
    """The benchmark checks each kernel against its reference before timing it and writes one JSON row per
    case. Here it runs end to end on a 6-channel 8x8 map (upsampled to 32x32) under the interpreter, with the
    timing functions replaced by constants, so that a broken case or report fails before device time is spent."""
    from benchmarks import kernels as bk

    monkeypatch.setattr(bk, "DEVICE", DEVICE)
    for name, value in dict(C=6, H=8, W=8, H2=32, W2=32, OUT_SIZE=(32, 32)).items():
        monkeypatch.setattr(bk, name, value)
    calls = []

    def fake_bench(fn, rep_ms):
        fn()  # every timed callable must run
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(bk, "_bench", fake_bench)
    monkeypatch.setattr(bk, "_bench_graph", lambda fn, rep_ms: 0.5)
    # two tile sizes per knob (the GPU run sweeps four): the logic is the same, the interpreter pays per call
    monkeypatch.setattr(bk, "TILE_SWEEP", {"patch": ("interp", "_TILE_ELEMS", (512, 2048)),
                                           "track": ("track", "_TRACK_TILE_ELEMS", (1024, 2048))})
    monkeypatch.setattr(bk, "copy_bandwidth_gbps", lambda rep_ms: 1000.0)
    monkeypatch.setattr(bk, "gpu_timing_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stub device")
    tiles = (interp_mod._TILE_ELEMS, track_mod._TRACK_TILE_ELEMS)
    sweep_on = dtype == "fp32"  # the sweep's logic does not depend on the dtype; once is enough on the interpreter
    assert bk.main(["--out", str(tmp_path), "--dtype", dtype, "--rep", "1"] + ["--sweep-tiles"] * sweep_on) == 0
    assert (interp_mod._TILE_ELEMS, track_mod._TRACK_TILE_ELEMS) == tiles  # put back after the sweep
    out = capsys.readouterr().out
    (path,) = tmp_path.glob(f"kernels-stub-device-{dtype}-*.json")
    report = json.loads(path.read_text())
    rows = report["results"]
    ops = {r["op"] for r in rows}
    assert ops == {"sample_patches", "sample_patches.backward", "patch_l1", "patch_l1.fwd+bwd", "track",
                   "fuse_gradients"}, ops
    assert len(rows) == 2 * (2 * 4 + 4) + 2  # N in {1, 10} x (2 radii x 4 patch ops + 2 radii x 2 tracking) + 2
    sweep = report["tile_sweep"]
    n_swept = (len(rows) - 2) * sweep_on  # all but the two fusion cases
    assert len(calls) == 2 * len(rows) + n_swept * 2  # Triton and reference per case, then Triton per tile size
    if not sweep_on:
        assert sweep is None
        return
    assert len(sweep) == n_swept * 2
    for knob, values, now in (("_TILE_ELEMS", {512, 2048}, tiles[0]), ("_TRACK_TILE_ELEMS", {1024, 2048}, tiles[1])):
        mine = [r for r in sweep if r["knob"] == knob]
        assert {r["value"] for r in mine} == values
        assert all(r["default"] == (r["value"] == now) for r in mine)
    assert any(r["default"] for r in sweep)  # 2048, the tracking tile in force, is one of the swept values
    # other tiles sum the channel blocks in another order: rounding only, on these maps
    assert max(r["max_abs_diff_vs_default"] for r in sweep if r["op"] != "track") < 1e-3
    assert all(r["compulsory_bytes"] > 0 and r["speedup"] == 1.0 for r in rows)
    assert report["sizes"] == {"C": 6, "map": [8, 8], "out_size": [32, 32]} and report["feat_dtype"] == dtype
    assert "target >= 3x over the reference (eager): NOT met" in out
