"""Bilinear patch sampling (`sample_patches`) and its loss-fused form (`patch_l1`), forward and backward.

The motion-supervision loss of DragDiffusion samples, for every handle, a (2r+1)^2 patch of a 640-channel
feature map that the official code first upsamples from 64x64 to 256x256 (42M elements, rebuilt every
step). Only N * (2r+1)^2 points of that upsampled map are ever read, so the kernels evaluate the
upsample *at the sampled points only*:

    U[I, J]   = sum of 2x2 taps of feat   (PyTorch's bilinear, align_corners=False)
    S(y, x)   = sum of 2x2 taps of U      (bilinear, coordinates clamped to the U grid)
              = sum of 4x4 taps of feat   (separable: 4 row taps x 4 column taps)

Without `out_size` the map is used as is and each sample is the usual 2x2 taps.

Numerics: weights and sums are fp32 whatever the map dtype; `sample_patches` rounds once, on store, to the
map dtype. `patch_l1` rounds the sample to the map dtype before |ref - sample| (the reference compares the
rounded patch), so a reference patch taken from the same map gives exactly 0 and a 0 gradient.

Backward (w.r.t. `feat` only) is a scatter-add of upstream-grad x tap-weight into an fp32 buffer with
atomics, cast to the map dtype at the end. `centers` and `ref_patches` get no gradient: in the pipeline
the points are integer-valued bookkeeping and the reference patch is always detached.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import (INTERPRET, KERNEL_DTYPES, as_tuple, cdiv, device_ctx, grid_size, new_output,
                        next_pow2, norm_out_size, use_triton)

__all__ = ["sample_patches", "patch_l1"]


# ----------------------------------------------------------------------------------------------------
# Shared device helpers (track.py uses _src_index and _round_half_even as well)
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _src_index(i, n_in, n_out):
    """Source taps of destination index `i` (int32) for PyTorch's bilinear resize n_in -> n_out.

    Mirrors ATen (align_corners=False, no scale_factor): scale = n_in / n_out in fp32,
    src = scale * (i + 0.5) - 0.5 clamped at 0, i0 = min(floor(src), n_in - 1), lam = clamp(src - i0, 0, 1),
    i1 = min(i0 + 1, n_in - 1). Same fp32 expression as ATen so that upsampled values agree to an ulp.
    """
    # div_rn: Triton's `/` may lower to an approximate divide; ATen's scale is an IEEE fp32 quotient.
    scale = tl.div_rn(n_in.to(tl.float32), n_out.to(tl.float32))
    src = tl.maximum(scale * (i.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), n_in - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.minimum(i0 + 1, n_in - 1)
    return i0, i1, lam


@triton.jit
def _round_half_even(x):
    """torch.round on fp32 (ties to even), without libdevice so that the interpreter runs it too."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _axis_taps(p, n_out, n_in, TAPS: tl.constexpr):
    """Taps along one axis for fractional coordinates `p` (fp32) on a grid of size n_out.

    Returns (indices, weights), two 4-tuples of tensors shaped like `p`. With TAPS == 2 (no upsample) only
    the first two entries are used (n_out == n_in); with TAPS == 4 the grid is the upsampled one and every
    U-grid neighbour expands into its two source taps, weight = bilinear weight x resize weight.
    """
    # Replicate border: clamp to the grid, as the reference does before flooring.
    p = tl.minimum(tl.maximum(p, 0.0), (n_out - 1).to(tl.float32))
    f = tl.floor(p)
    t = p - f
    i0 = f.to(tl.int32)
    i1 = tl.minimum(i0 + 1, n_out - 1)
    if TAPS == 4:
        a0, a1, la = _src_index(i0, n_in, n_out)
        b0, b1, lb = _src_index(i1, n_in, n_out)
        u = 1.0 - t
        idx = (a0, a1, b0, b1)
        wts = (u * (1.0 - la), u * la, t * (1.0 - lb), t * lb)
    else:
        zero = tl.zeros_like(t)
        idx = (i0, i1, i0, i1)
        wts = (1.0 - t, t, zero, zero)
    return idx, wts


@triton.jit
def _sample_tile(base, w, rows, rw, cols, cw, mask, TAPS: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """fp32 [BLOCK_C, BLOCK_P] tile of samples: sum_a rw[a] * sum_b cw[b] * plane[rows[a], cols[b]].

    `base` is [BLOCK_C, 1] pointers to the channel planes; all indices are already clamped into the map,
    so `mask` only trims the padding lanes. The inner (column) sum is done first so that each row costs
    one multiply by its weight; re-association vs the reference is at the ulp level.
    """
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for a in tl.static_range(TAPS):
        roff = rows[a] * w
        part = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for b in tl.static_range(TAPS):
            v = tl.load(base + (roff + cols[b])[None, :], mask=mask, other=0.0)
            part += cw[b][None, :] * v.to(tl.float32)
        acc += rw[a][None, :] * part
    return acc


@triton.jit
def _scatter_tile(gbase, w, rows, rw, cols, cw, g, mask, TAPS: tl.constexpr):
    """Adjoint of _sample_tile: plane[rows[a], cols[b]] += rw[a] * cw[b] * g, with fp32 atomics.

    Taps whose weight is exactly 0 (integer coordinates, zero resize weights) are masked out: they add
    nothing and would only cost atomics, which contend heavily here because the neighbouring window
    positions of one channel share their taps. `relaxed` ordering: only the final sums matter.
    """
    for a in tl.static_range(TAPS):
        roff = rows[a] * w
        for b in tl.static_range(TAPS):
            wt = (rw[a] * cw[b])[None, :]
            tl.atomic_add(gbase + (roff + cols[b])[None, :], g * wt, mask=mask & (wt != 0.0), sem="relaxed")


@triton.jit
def _window_coords(centers_ptr, i, pb, RADIUS: tl.constexpr, BLOCK_P: tl.constexpr):
    """Fractional (y, x) of window positions pb*BLOCK_P + [0, BLOCK_P) around center i, and their mask."""
    K: tl.constexpr = 2 * RADIUS + 1
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    # Same fp32 add as the reference: center (cast to fp32 first) + integer offset.
    cy = tl.load(centers_ptr + 2 * i).to(tl.float32)
    cx = tl.load(centers_ptr + 2 * i + 1).to(tl.float32)
    y = cy + (offs_p // K - RADIUS).to(tl.float32)
    x = cx + (offs_p % K - RADIUS).to(tl.float32)
    return offs_p, y, x, offs_p < K * K


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
# Grid: (N points, P blocks, C blocks). One program owns a [BLOCK_C, BLOCK_P] tile of one point's patch:
# the tap indices/weights are computed once per position and reused across the channel block, and the
# loads of a row of window positions hit neighbouring addresses of each channel plane (L1/L2-resident:
# the footprint of a patch on the source map is a few pixels wide).
# Sizes (C, h, w, H2, W2, M) are not specialized: a value of 1 would otherwise turn into a constexpr.

@triton.jit
def _patch_tile(centers_ptr, C, h, w, H2, W2, RADIUS: tl.constexpr, TAPS: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The tile shared by the forward and backward kernels: this program's point i, its block of window
    positions and of channels, their taps and weights on the source map, the valid mask, the int64 channel-plane
    offsets and the int64 [N, C, P] offsets of the tile."""
    K: tl.constexpr = 2 * RADIUS + 1
    P: tl.constexpr = K * K
    i = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    offs_p, y, x, mask_p = _window_coords(centers_ptr, i, pb, RADIUS, BLOCK_P)
    rows, rw = _axis_taps(y, H2, h, TAPS)
    cols, cw = _axis_taps(x, W2, w, TAPS)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_c < C)[:, None] & mask_p[None, :]
    # int64: C * h * w can exceed 2^31 for large maps, and N * C * P grows with the window.
    plane = (offs_c.to(tl.int64) * h.to(tl.int64) * w)[:, None]
    out_off = ((i.to(tl.int64) * C + offs_c) * P)[:, None] + offs_p[None, :]
    return i, pb, cb, rows, rw, cols, cw, mask, plane, out_off


@triton.jit(do_not_specialize=["C", "h", "w", "H2", "W2"])
def _patch_fwd_kernel(
    feat_ptr, centers_ptr, ref_ptr, out_ptr,
    C, h, w, H2, W2,
    RADIUS: tl.constexpr, TAPS: tl.constexpr, L1: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    i, pb, cb, rows, rw, cols, cw, mask, plane, out_off = _patch_tile(
        centers_ptr, C, h, w, H2, W2, RADIUS, TAPS, BLOCK_C, BLOCK_P)
    acc = _sample_tile(feat_ptr + plane, w, rows, rw, cols, cw, mask, TAPS, BLOCK_C, BLOCK_P)
    if L1:
        # Round the sample to the map dtype first: the reference compares the rounded patch.
        s = acc.to(feat_ptr.dtype.element_ty).to(tl.float32)
        r = tl.load(ref_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, tl.abs(r - s), 0.0)
        # One partial per program, summed on the host side of the graph in a fixed order: deterministic,
        # and every slot is written, so a poisoned buffer proves full coverage.
        slot = (i * tl.num_programs(1) + pb) * tl.num_programs(2) + cb
        tl.store(out_ptr + slot, tl.sum(tl.sum(d, axis=1), axis=0))
    else:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["C", "h", "w", "H2", "W2", "M"])
def _patch_bwd_kernel(
    feat_ptr, centers_ptr, ref_ptr, gout_ptr, gfeat_ptr,
    C, h, w, H2, W2, M,
    RADIUS: tl.constexpr, TAPS: tl.constexpr, L1: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    i, pb, cb, rows, rw, cols, cw, mask, plane, out_off = _patch_tile(
        centers_ptr, C, h, w, H2, W2, RADIUS, TAPS, BLOCK_C, BLOCK_P)
    if L1:
        # d/dS mean|ref - S| = -sign(ref - S) * g / M, with sign(0) = 0 as in autograd's abs.
        # The sample is recomputed (16 L2-hot loads) instead of saved: no [N, C, P] buffer round trip.
        acc = _sample_tile(feat_ptr + plane, w, rows, rw, cols, cw, mask, TAPS, BLOCK_C, BLOCK_P)
        s = acc.to(feat_ptr.dtype.element_ty).to(tl.float32)
        r = tl.load(ref_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
        gi = tl.load(gout_ptr + i).to(tl.float32) / M.to(tl.float32)
        diff = r - s
        g = tl.where(diff > 0, -gi, tl.where(diff < 0, gi, 0.0))
    else:
        g = tl.load(gout_ptr + out_off, mask=mask, other=0.0).to(tl.float32)

    _scatter_tile(gfeat_ptr + plane, w, rows, rw, cols, cw, g, mask, TAPS)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

# Elements per program. The CPU interpreter pays per program, not per element, so it gets bigger tiles;
# tests lower this to cover several channel blocks on tiny maps.
_TILE_ELEMS = 4096 if INTERPRET else 1024


def _tiles(C: int, P: int, elems: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for a patch of P positions: ~`elems` elements per program (4 warps).

    BLOCK_P is the power of two in [16, 128] that pads P the least (ties: the larger), e.g. 9 -> 16,
    81 -> 32 (3 blocks, 96 lanes instead of 128), 625 -> 128.
    """
    block_p = min((16, 32, 64, 128), key=lambda b: (cdiv(P, b) * b, -b))
    block_c = min(next_pow2(C), max(1, elems // block_p))
    return block_c, block_p


def _bwd_tile_elems(out_size) -> int:
    """Tile of the backward scatter. On the upsampled map every element scatters 16 taps (fp32 atomics) and
    the fused-L1 form also recomputes the sample, so on a GPU it gets half the forward's tile: at 1K elements
    Triton 3.6 (the GPU image's) compiles it for sm_90 at 255 registers with 460-516 B of spills in bf16/fp16,
    at 512 with none (`python -m benchmarks.compile_sm90` prints registers and spills of every launch).
    """
    return _TILE_ELEMS if INTERPRET or out_size is None else _TILE_ELEMS // 2


def _check(feat: torch.Tensor, centers: torch.Tensor, radius: int) -> None:
    if feat.dim() != 3:
        raise ValueError(f"feat must be [C, h, w], got shape {tuple(feat.shape)}")
    if centers.dim() != 2 or centers.shape[1] != 2:
        raise ValueError(f"centers must be [N, 2], got shape {tuple(centers.shape)}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")


def _triton_ok(feat: torch.Tensor, *others: torch.Tensor) -> bool:
    return feat.dtype in KERNEL_DTYPES and use_triton(feat, *others)


def _launch(kernel, feat, centers, ref, out, extra, radius, out_size, L1, grid_p_c):
    C, h, w = feat.shape
    H2, W2 = grid_size(feat, out_size)
    block_c, block_p, grid = grid_p_c
    with device_ctx(feat):
        kernel[grid](feat, centers, ref, *out, C, h, w, H2, W2, *extra,
                     RADIUS=radius, TAPS=2 if out_size is None else 4, L1=L1,
                     BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)


def _grid(N: int, C: int, radius: int, elems: int | None = None):
    P = (2 * radius + 1) ** 2
    block_c, block_p = _tiles(C, P, _TILE_ELEMS if elems is None else elems)
    return block_c, block_p, (N, cdiv(P, block_p), cdiv(C, block_c))


def _sample_patches_fwd_triton(feat, centers, radius, out_size):
    feat, centers = feat.contiguous(), centers.contiguous()
    C, N, k = feat.shape[0], centers.shape[0], 2 * radius + 1
    out = new_output((N, C, k, k), feat.dtype, feat.device)
    if out.numel() == 0:
        return out
    _launch(_patch_fwd_kernel, feat, centers, feat, (out,), (), radius, out_size, False, _grid(N, C, radius))
    return out


def _patch_l1_fwd_triton(feat, ref_patches, centers, radius, out_size):
    feat, centers = feat.contiguous(), centers.contiguous()
    C, N, k = feat.shape[0], centers.shape[0], 2 * radius + 1
    ref = ref_patches.expand(N, C, k, k).contiguous()
    if N == 0 or C == 0:
        # nothing to launch; the mean over an empty patch is NaN, as in the reference
        return torch.full((N,), float("nan"), dtype=torch.float32, device=feat.device)
    grid = _grid(N, C, radius)
    n_slots = grid[2][1] * grid[2][2]
    partials = new_output((N, n_slots), torch.float32, feat.device)
    _launch(_patch_fwd_kernel, feat, centers, ref, (partials,), (), radius, out_size, True, grid)
    # Fixed-order second-level reduction (a handful of partials per point), then the mean.
    return partials.sum(1) / (C * k * k)


def _sample_patches_bwd_triton(grad, centers, radius, out_size, h, w, dtype):
    grad, centers = grad.contiguous(), centers.contiguous()
    N, C = grad.shape[0], grad.shape[1]
    # Scatter-add target: must start at 0 (never poisoned); fp32 so that atomics accumulate accurately.
    gfeat = torch.zeros((C, h, w), dtype=torch.float32, device=grad.device)
    if N and C:
        # The kernel only needs the map's shape here; `gfeat` stands in for the (unused) map pointer.
        _launch(_patch_bwd_kernel, gfeat, centers, grad, (grad, gfeat), (1,), radius, out_size, False,
                _grid(N, C, radius, _bwd_tile_elems(out_size)))
    return gfeat.to(dtype)


def _patch_l1_bwd_triton(grad, feat, ref_patches, centers, radius, out_size):
    feat, centers, grad = feat.contiguous(), centers.contiguous(), grad.contiguous()
    C, h, w = feat.shape
    N, k = centers.shape[0], 2 * radius + 1
    ref = ref_patches.expand(N, C, k, k).contiguous()
    gfeat = torch.zeros((C, h, w), dtype=torch.float32, device=feat.device)
    if N and C:
        _launch(_patch_bwd_kernel, feat, centers, ref, (grad, gfeat), (C * k * k,), radius, out_size, True,
                _grid(N, C, radius, _bwd_tile_elems(out_size)))
    return gfeat.to(feat.dtype)


# ----------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------
# custom_op keeps each op opaque to torch.compile (one node in the graph, fullgraph-safe, no host sync so
# it can be captured in a CUDA graph); the fake implementations give compile the output metadata. The
# Triton-vs-reference choice happens inside the op at run time, so the kill switch works under compile.
# The reference backward inside the backward ops uses torch.func.vjp, which works below the autograd key.

@torch.library.custom_op("fastdrag::sample_patches", mutates_args=())
def _sample_patches_op(feat: torch.Tensor, centers: torch.Tensor, radius: int,
                       out_size: Optional[list[int]]) -> torch.Tensor:
    if _triton_ok(feat, centers):
        return _sample_patches_fwd_triton(feat, centers, radius, out_size)
    # The reference returns a permuted view; the op's contract (and its fake) is a contiguous tensor.
    return reference.sample_patches(feat, centers, radius, out_size=as_tuple(out_size)).contiguous()


@_sample_patches_op.register_fake
def _(feat, centers, radius, out_size):
    k = 2 * radius + 1
    return feat.new_empty((centers.shape[0], feat.shape[0], k, k))


@torch.library.custom_op("fastdrag::sample_patches_backward", mutates_args=())
def _sample_patches_bwd_op(grad: torch.Tensor, centers: torch.Tensor, radius: int, out_size: Optional[list[int]],
                           h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype in KERNEL_DTYPES and use_triton(grad, centers):
        return _sample_patches_bwd_triton(grad, centers, radius, out_size, h, w, dtype)
    # The op is linear in feat, so its vjp does not depend on where it is taken: use a zero map.
    feat0 = torch.zeros((grad.shape[1], h, w), dtype=dtype, device=grad.device)
    _, vjp = torch.func.vjp(
        lambda f: reference.sample_patches(f, centers, radius, out_size=as_tuple(out_size)), feat0)
    return vjp(grad.to(dtype))[0].contiguous()


@_sample_patches_bwd_op.register_fake
def _(grad, centers, radius, out_size, h, w, dtype):
    return grad.new_empty((grad.shape[1], h, w), dtype=dtype)


def _sample_patches_setup(ctx, inputs, output):
    feat, centers, radius, out_size = inputs
    ctx.save_for_backward(centers)
    ctx.args = (radius, out_size, feat.shape[1], feat.shape[2], feat.dtype)


def _sample_patches_backward(ctx, grad):
    (centers,) = ctx.saved_tensors
    radius, out_size, h, w, dtype = ctx.args
    gfeat = torch.ops.fastdrag.sample_patches_backward(grad, centers, radius, out_size, h, w, dtype)
    return gfeat, None, None, None


_sample_patches_op.register_autograd(_sample_patches_backward, setup_context=_sample_patches_setup)


@torch.library.custom_op("fastdrag::patch_l1", mutates_args=())
def _patch_l1_op(feat: torch.Tensor, ref_patches: torch.Tensor, centers: torch.Tensor, radius: int,
                 out_size: Optional[list[int]]) -> torch.Tensor:
    if _triton_ok(feat, ref_patches, centers):
        return _patch_l1_fwd_triton(feat, ref_patches, centers, radius, out_size)
    return reference.patch_l1(feat, ref_patches, centers, radius, out_size=as_tuple(out_size))


@_patch_l1_op.register_fake
def _(feat, ref_patches, centers, radius, out_size):
    return feat.new_empty((centers.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastdrag::patch_l1_backward", mutates_args=())
def _patch_l1_bwd_op(grad: torch.Tensor, feat: torch.Tensor, ref_patches: torch.Tensor, centers: torch.Tensor,
                     radius: int, out_size: Optional[list[int]]) -> torch.Tensor:
    if _triton_ok(feat, grad, ref_patches, centers):
        return _patch_l1_bwd_triton(grad, feat, ref_patches, centers, radius, out_size)
    _, vjp = torch.func.vjp(
        lambda f: reference.patch_l1(f, ref_patches, centers, radius, out_size=as_tuple(out_size)), feat)
    return vjp(grad.float())[0].contiguous()


@_patch_l1_bwd_op.register_fake
def _(grad, feat, ref_patches, centers, radius, out_size):
    return torch.empty_like(feat, memory_format=torch.contiguous_format)


def _patch_l1_setup(ctx, inputs, output):
    feat, ref_patches, centers, radius, out_size = inputs
    ctx.save_for_backward(feat, ref_patches, centers)
    ctx.args = (radius, out_size)


def _patch_l1_backward(ctx, grad):
    feat, ref_patches, centers = ctx.saved_tensors
    radius, out_size = ctx.args
    gfeat = torch.ops.fastdrag.patch_l1_backward(grad, feat, ref_patches.detach(), centers, radius, out_size)
    return gfeat, None, None, None, None


_patch_l1_op.register_autograd(_patch_l1_backward, setup_context=_patch_l1_setup)


# ----------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------

def sample_patches(feat: torch.Tensor, centers: torch.Tensor, radius: int, *,
                   out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear (2r+1)x(2r+1) patches of a feature map around fractional centers.

    Args:
        feat: [C, h, w] map, float32 / bfloat16 / float16 (other dtypes take the reference).
        centers: [N, 2] float (row, col), on the grid of the sampled map.
        radius: r; the patch side is k = 2r + 1.
        out_size: optional (H2, W2). The sampled map is then
            ``F.interpolate(feat[None], out_size, mode="bilinear", align_corners=False)[0]``, evaluated only
            at the needed points (up to 16 taps of `feat` per output), never built.

    Returns:
        [N, C, k, k] in feat's dtype, with ``out[i, c, a, b] = map_c(centers[i, 0] + a - r,
        centers[i, 1] + b - r)`` sampled bilinearly, coordinates clamped to the map (replicate border).
        Differentiable w.r.t. `feat` (scatter-add backward); `centers` gets no gradient.

    Example:
        >>> feat = torch.randn(640, 64, 64, device="cuda", dtype=torch.bfloat16)
        >>> centers = torch.tensor([[100.0, 120.5]], device="cuda")
        >>> sample_patches(feat, centers, 4, out_size=(256, 256)).shape
        torch.Size([1, 640, 9, 9])
    """
    _check(feat, centers, radius)
    return torch.ops.fastdrag.sample_patches(feat, centers, int(radius), norm_out_size(feat, out_size))


def patch_l1(feat: torch.Tensor, ref_patches: torch.Tensor, centers: torch.Tensor, radius: int, *,
             out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Loss-fused `sample_patches`: per-point mean |ref_patches - patch|, without materializing the patch.

    Args:
        feat: [C, h, w] map (float32 / bfloat16 / float16).
        ref_patches: [N, C, k, k] (or broadcastable to it), any float dtype; compared in fp32.
        centers, radius, out_size: as in `sample_patches`.

    Returns:
        float32 [N], ``loss[i] = mean_{c,a,b} |ref_patches[i,c,a,b] - sample_patches(feat, ...)[i,c,a,b]|``
        where the sample is rounded to feat's dtype first (as the reference does). Differentiable w.r.t.
        `feat` only: ``d loss[i] / d S = -sign(ref - S) / (C k^2)`` (sign(0) = 0), scattered to the taps.
        No gradient flows to `ref_patches` (the pipeline always detaches it) or to `centers`.

    Example:
        >>> ref = sample_patches(f0, handles, 1, out_size=(256, 256)).detach()
        >>> loss = patch_l1(feat, ref, handles + step, 1, out_size=(256, 256)).sum()
        >>> loss.backward()
    """
    _check(feat, centers, radius)
    return torch.ops.fastdrag.patch_l1(feat, ref_patches, centers, int(radius), norm_out_size(feat, out_size))
