"""CLIPDrag's global-local gradient fusion (`fuse_gradients`).

The op needs three global reductions (<g_l, g_g>, |g_l|^2, |g_g|^2) before any output element can be
written. Two layouts:
- small tensors (the 4x64x64 latent gradient, 16K elements): one program reads the data twice, once to
  reduce and once to combine. A single launch; the second read hits L2.
- large tensors: a grid-strided reduction kernel writes one (dot, |l|^2, |g|^2) partial per program, and
  the combine kernel re-reduces those few partials in every program (in a fixed order, so the result is
  deterministic) before combining its tile.
The reductions stay on the device; nothing here synchronizes with the host. Sums and the combine are in
fp32; the output has g_local's dtype and shape.
"""

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import KERNEL_DTYPES, cdiv, device_ctx, new_output, next_pow2, use_triton

__all__ = ["fuse_gradients"]

_RULES = {"clipdrag": 0, "projection": 1}

# Up to this many elements take the single-program kernel; tests lower it to cover both layouts.
_SINGLE_PROGRAM_MAX = 1 << 15
_BLOCK = 1024           # elements per tile
_MAX_PARTIALS = 512     # reduction programs in the two-kernel layout (a few per SM)


@triton.jit
def _fuse_coeffs(dot, sl, sg, RULE: tl.constexpr):
    """Scalar coefficients, as in the reference: (cos >= 0, coef) for clipdrag, (cos >= 0, proj) else.

    cos = dot / (|l| |g|), or 0 when either norm is 0; sin = sqrt(max(0, 1 - cos^2));
    clipdrag coef = sin if cos >= 0 else cos; projection proj = dot / |l|^2 (the (g_g.u) factor of u u^T g_g
    expressed on g_l itself), or 0 when |l| = 0. IEEE sqrt/divide: Triton's defaults may be approximate.
    """
    tiny: tl.constexpr = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny
    nl = tl.sqrt_rn(sl)
    ng = tl.sqrt_rn(sg)
    denom = nl * ng
    cos = tl.where(denom > 0, tl.div_rn(dot, tl.maximum(denom, tiny)), 0.0)
    pos = cos >= 0
    if RULE == 0:
        sin = tl.sqrt_rn(tl.maximum(1.0 - cos * cos, 0.0))
        coef = tl.where(pos, sin, cos)
    else:
        coef = tl.where(nl > 0, tl.div_rn(dot, tl.maximum(nl * nl, tiny)), 0.0)
    return pos, coef


@triton.jit
def _fuse_tile(gl_ptr, gg_ptr, out_ptr, offs, mask, lam, pos, coef, RULE: tl.constexpr):
    """out = combine(g_l, g_g) on one tile, with the reference's operation order."""
    a = tl.load(gl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(gg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RULE == 0:
        out = a + (lam * coef) * b
    else:
        par = coef * a  # (g_g.u) u
        out = tl.where(pos, a + lam * (b - par), a + lam * par)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot3_tile(gl_ptr, gg_ptr, t, n, acc_d, acc_l, acc_g, BLOCK: tl.constexpr):
    """Add tile t's contributions to the three running sums <g_l, g_g>, |g_l|^2, |g_g|^2 (fp32, int64 offsets)."""
    offs = tl.cast(t, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(gl_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(gg_ptr + offs, mask=m, other=0.0).to(tl.float32)
    return acc_d + a * b, acc_l + a * a, acc_g + b * b


@triton.jit(do_not_specialize=["n"])
def _fuse_single_kernel(gl_ptr, gg_ptr, out_ptr, n, lam, RULE: tl.constexpr, BLOCK: tl.constexpr):
    lam = tl.cast(lam, tl.float32)  # fp32 whatever the caller passed (and a tensor under the interpreter)
    n_tiles = tl.cdiv(n, BLOCK)
    acc_d = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, n_tiles):
        acc_d, acc_l, acc_g = _dot3_tile(gl_ptr, gg_ptr, t, n, acc_d, acc_l, acc_g, BLOCK)
    pos, coef = _fuse_coeffs(tl.sum(acc_d, axis=0), tl.sum(acc_l, axis=0), tl.sum(acc_g, axis=0), RULE)
    for t in range(0, n_tiles):
        offs = tl.cast(t, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        _fuse_tile(gl_ptr, gg_ptr, out_ptr, offs, offs < n, lam, pos, coef, RULE)


@triton.jit(do_not_specialize=["n"])
def _fuse_reduce_kernel(gl_ptr, gg_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(n, BLOCK)
    acc_d = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
    # Grid-strided: a bounded number of partials whatever the size (int64 offsets past 2^31 elements).
    for t in range(pid, n_tiles, nprog):
        acc_d, acc_l, acc_g = _dot3_tile(gl_ptr, gg_ptr, t, n, acc_d, acc_l, acc_g, BLOCK)
    # Partials laid out [3, nprog]: every slot written once (poison-checkable).
    tl.store(part_ptr + pid, tl.sum(acc_d, axis=0))
    tl.store(part_ptr + nprog + pid, tl.sum(acc_l, axis=0))
    tl.store(part_ptr + 2 * nprog + pid, tl.sum(acc_g, axis=0))


@triton.jit(do_not_specialize=["n", "n_part"])
def _fuse_combine_kernel(gl_ptr, gg_ptr, part_ptr, out_ptr, n, n_part, lam,
                         RULE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_PART: tl.constexpr):
    lam = tl.cast(lam, tl.float32)  # fp32 whatever the caller passed (and a tensor under the interpreter)
    pp = tl.arange(0, BLOCK_PART)
    mp = pp < n_part
    # Every program re-reduces the (<= 512, L2-resident) partials: cheaper than a third launch.
    dot = tl.sum(tl.load(part_ptr + pp, mask=mp, other=0.0), axis=0)
    sl = tl.sum(tl.load(part_ptr + n_part + pp, mask=mp, other=0.0), axis=0)
    sg = tl.sum(tl.load(part_ptr + 2 * n_part + pp, mask=mp, other=0.0), axis=0)
    pos, coef = _fuse_coeffs(dot, sl, sg, RULE)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _fuse_tile(gl_ptr, gg_ptr, out_ptr, offs, offs < n, lam, pos, coef, RULE)


def _fuse_triton(g_local, g_global, lam, rule):
    gl = g_local.reshape(-1).contiguous()
    gg = g_global.reshape(-1).contiguous()
    n = gl.numel()
    out = new_output(g_local.shape, g_local.dtype, g_local.device)
    if n == 0:
        return out
    code = _RULES[rule]
    with device_ctx(gl):
        if n <= _SINGLE_PROGRAM_MAX:
            _fuse_single_kernel[(1,)](gl, gg, out, n, float(lam), RULE=code, BLOCK=_BLOCK, num_warps=8)
        else:
            n_tiles = cdiv(n, _BLOCK)
            n_part = min(n_tiles, _MAX_PARTIALS)
            part = new_output((3, n_part), torch.float32, gl.device)
            _fuse_reduce_kernel[(n_part,)](gl, gg, part, n, BLOCK=_BLOCK, num_warps=4)
            _fuse_combine_kernel[(n_tiles,)](gl, gg, part, out, n, n_part, float(lam),
                                             RULE=code, BLOCK=_BLOCK, BLOCK_PART=next_pow2(n_part), num_warps=4)
    return out


@torch.library.custom_op("fastdrag::fuse_gradients", mutates_args=())
def _fuse_op(g_local: torch.Tensor, g_global: torch.Tensor, lam: float, rule: str) -> torch.Tensor:
    if g_local.dtype in KERNEL_DTYPES and g_global.dtype in KERNEL_DTYPES and use_triton(g_local, g_global):
        return _fuse_triton(g_local, g_global, lam, rule)
    return reference.fuse_gradients(g_local, g_global, lam, rule=rule)


@_fuse_op.register_fake
def _(g_local, g_global, lam, rule):
    return g_local.new_empty(g_local.shape)


def fuse_gradients(g_local: torch.Tensor, g_global: torch.Tensor, lam: float, *,
                   rule: str = "clipdrag") -> torch.Tensor:
    """CLIPDrag's fusion of the local (drag) and global (text) gradients over the flattened tensors.

    With cos = <g_l, g_g> / (|g_l| |g_g|) (0 if either norm is 0) and sin = sqrt(max(0, 1 - cos^2)):
    - rule="clipdrag" (the official code): cos >= 0 -> g_l + lam*sin*g_g, else g_l + lam*cos*g_g;
    - rule="projection", with u = g_l/|g_l|: cos >= 0 -> g_l + lam*(g_g - (g_g.u)u), else g_l + lam*(g_g.u)u.

    Args:
        g_local, g_global: tensors with the same number of elements (float32 / bfloat16 / float16 take
            the kernel); reductions and the combine are done in fp32.
        lam: the fusion weight.
        rule: "clipdrag" or "projection".

    Returns:
        A tensor with g_local's shape and dtype. Not differentiable (it combines gradients).
        No host synchronization: the reductions stay on the device.

    Example:
        >>> g = fuse_gradients(grad_drag, grad_clip, 0.1, rule="clipdrag")
    """
    if rule not in _RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; expected 'clipdrag' or 'projection'")
    if g_local.numel() != g_global.numel():
        raise ValueError(f"g_local and g_global must have the same number of elements, "
                         f"got {tuple(g_local.shape)} and {tuple(g_global.shape)}")
    return torch.ops.fastdrag.fuse_gradients(g_local.detach(), g_global.detach(), float(lam), rule)
