"""Point tracking: windowed L1 nearest neighbour of each handle's reference feature (`track`).

For handle i the candidates are the integer points q of the (optionally upsampled) map within
handle +- radius, clipped to the map; the winner minimizes sum_c |ref[i, c] - F(q)[c]|, the first minimum
in row-major window order winning ties. With closer_only (CLIPDrag's fast point tracking) only q strictly
closer to the target than the handle compete, and a handle within distance 1 of its target, or with no
candidate left, stays put.

Two launches, no host sync:
1. `_track_dist_kernel`, grid (N, SPLIT): each program sums |ref - F(q)| over its slice of channels for all
   (2r+1)^2 window positions at once and writes a partial distance vector. Splitting the channels is what
   fills the GPU: N is at most ~10, while C = 640. With out_size, F(q) is the upsampled map at an integer
   point, i.e. 2x2 taps of `feat` with PyTorch's resize weights, rounded to the map dtype as the
   reference's materialized upsample is (so structural ties, e.g. duplicated border rows, stay ties).
2. `_track_select_kernel`, grid (N,): sums the partials in a fixed order, applies the validity and
   closer-only masks, takes the first argmin and writes the new handle.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import (INTERPRET, KERNEL_DTYPES, as_tuple, cdiv, device_ctx, grid_size, new_output,
                        next_pow2, norm_out_size, use_triton)
from .interp import _round_half_even, _src_index

__all__ = ["track"]

# About this many programs for the distance pass (a couple of waves on an H100's 132 SMs). The CPU
# interpreter pays per program, so it keeps one program per handle; tests raise it to cover the split.
_TARGET_PROGRAMS = 1 if INTERPRET else 256

# Tile elements per channel step of the distance pass: a whole 25x25 window (1024 lanes) x 2 channels, or
# 64 lanes x 32 channels. On the upsampled map each element gathers 4 taps, and on a GPU that gets half the
# tile: at 2K, Triton 3.6 (the GPU image's) compiles the radius-3 pass for sm_90 at 255 registers with spills,
# at 1K at 144 without (`python -m benchmarks.compile_sm90`).
_TRACK_TILE_ELEMS = 2048


def _track_tile_elems(out_size) -> int:
    return _TRACK_TILE_ELEMS if INTERPRET or out_size is None else _TRACK_TILE_ELEMS // 2


@triton.jit
def _track_window(handles_ptr, i, H2, W2, RADIUS: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Rounded handle (hy, hx), window points (qy, qx) in row-major order, and which are on the map."""
    K: tl.constexpr = 2 * RADIUS + 1
    offs_q = tl.arange(0, BLOCK_Q)
    # handles.round() in the reference: round half to even.
    hy = _round_half_even(tl.load(handles_ptr + 2 * i).to(tl.float32)).to(tl.int32)
    hx = _round_half_even(tl.load(handles_ptr + 2 * i + 1).to(tl.float32)).to(tl.int32)
    qy = hy + offs_q // K - RADIUS
    qx = hx + offs_q % K - RADIUS
    valid = (offs_q < K * K) & (qy >= 0) & (qy < H2) & (qx >= 0) & (qx < W2)
    return offs_q, hy, hx, qy, qx, valid


@triton.jit(do_not_specialize=["C", "h", "w", "H2", "W2", "C_SPLIT"])
def _track_dist_kernel(
    feat_ptr, ref_ptr, handles_ptr, part_ptr,
    C, h, w, H2, W2, C_SPLIT,
    RADIUS: tl.constexpr, TAPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    i = tl.program_id(0)
    s = tl.program_id(1)
    offs_q, hy, hx, qy, qx, valid = _track_window(handles_ptr, i, H2, W2, RADIUS, BLOCK_Q)
    # Clamp so that every address is in the map even for masked lanes; invalid lanes are dropped below.
    qy = tl.minimum(tl.maximum(qy, 0), H2 - 1)
    qx = tl.minimum(tl.maximum(qx, 0), W2 - 1)
    if TAPS == 4:
        # Resize taps depend only on the position: computed once, reused for every channel block.
        r0, r1, lr = _src_index(qy, h, H2)
        c0, c1, lc = _src_index(qx, w, W2)
        o00 = (r0 * w + c0)[None, :]
        o01 = (r0 * w + c1)[None, :]
        o10 = (r1 * w + c0)[None, :]
        o11 = (r1 * w + c1)[None, :]
        wr0 = (1.0 - lr)[None, :]
        wr1 = lr[None, :]
        wc0 = (1.0 - lc)[None, :]
        wc1 = lc[None, :]
    else:
        o00 = (qy * w + qx)[None, :]

    hw = h.to(tl.int64) * w
    ref_row = ref_ptr + i.to(tl.int64) * C
    c_lo = s * C_SPLIT
    dist = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for cc in range(0, C_SPLIT, BLOCK_C):
        offs_c = c_lo + cc + tl.arange(0, BLOCK_C)
        mask_c = (offs_c < C) & (cc + tl.arange(0, BLOCK_C) < C_SPLIT)
        m = mask_c[:, None] & valid[None, :]
        base = feat_ptr + (offs_c.to(tl.int64) * hw)[:, None]
        if TAPS == 4:
            # ATen's order: rows of (column-interpolated) values, then the row weights.
            top = tl.load(base + o00, mask=m, other=0.0).to(tl.float32) * wc0 \
                + tl.load(base + o01, mask=m, other=0.0).to(tl.float32) * wc1
            bot = tl.load(base + o10, mask=m, other=0.0).to(tl.float32) * wc0 \
                + tl.load(base + o11, mask=m, other=0.0).to(tl.float32) * wc1
            v = (top * wr0 + bot * wr1).to(feat_ptr.dtype.element_ty).to(tl.float32)
        else:
            v = tl.load(base + o00, mask=m, other=0.0).to(tl.float32)
        r = tl.load(ref_row + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        dist += tl.sum(tl.where(m, tl.abs(r[:, None] - v), 0.0), axis=0)
    # Every lane is stored (padding lanes too), so a poisoned buffer proves full coverage.
    tl.store(part_ptr + (i.to(tl.int64) * tl.num_programs(1) + s) * BLOCK_Q + offs_q, dist)


@triton.jit(do_not_specialize=["H2", "W2", "SPLIT"])
def _track_select_kernel(
    part_ptr, handles_ptr, targets_ptr, out_ptr,
    H2, W2, SPLIT,
    RADIUS: tl.constexpr, CLOSER: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    K: tl.constexpr = 2 * RADIUS + 1
    i = tl.program_id(0)
    offs_q, hy, hx, qy, qx, valid = _track_window(handles_ptr, i, H2, W2, RADIUS, BLOCK_Q)
    dist = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for s in range(0, SPLIT):
        dist += tl.load(part_ptr + (i.to(tl.int64) * SPLIT + s) * BLOCK_Q + offs_q)
    if CLOSER:
        gy = tl.load(targets_ptr + 2 * i).to(tl.float32)
        gx = tl.load(targets_ptr + 2 * i + 1).to(tl.float32)
        dqy = qy.to(tl.float32) - gy
        dqx = qx.to(tl.float32) - gx
        dhy = hy.to(tl.float32) - gy
        dhx = hx.to(tl.float32) - gx
        dh = dhy * dhy + dhx * dhx
        # |h - g|^2 <= 1 turns the bound into 0, which no |q - g|^2 >= 0 beats: the handle stays put.
        valid = valid & (dqy * dqy + dqx * dqx < tl.where(dh > 1.0, dh, 0.0))
    dist = tl.where(valid, dist, float("inf"))
    # First minimum in row-major order (tie_break_left), as torch.argmin.
    best = tl.argmin(dist, axis=0, tie_break_left=True)
    any_valid = tl.max(valid.to(tl.int32), axis=0) > 0
    ny = tl.where(any_valid, hy + best // K - RADIUS, hy)
    nx = tl.where(any_valid, hx + best % K - RADIUS, hx)
    # The store converts to the handles' dtype.
    tl.store(out_ptr + 2 * i, ny)
    tl.store(out_ptr + 2 * i + 1, nx)


def _split(N: int, C: int, block_c: int) -> tuple[int, int]:
    """(channels per program, number of splits): ~_TARGET_PROGRAMS programs, whole channel blocks each."""
    n_cblocks = cdiv(C, block_c)
    split = max(1, min(n_cblocks, cdiv(_TARGET_PROGRAMS, max(N, 1))))
    c_split = cdiv(n_cblocks, split) * block_c
    return c_split, cdiv(C, c_split)


def _track_triton(feat, ref, handles, targets, radius, out_size, closer_only):
    feat, ref, handles, targets = feat.contiguous(), ref.contiguous(), handles.contiguous(), targets.contiguous()
    C, h, w = feat.shape
    N = handles.shape[0]
    H2, W2 = grid_size(feat, out_size)
    out = new_output((N, 2), handles.dtype, handles.device)
    if N == 0:
        return out
    block_q = next_pow2((2 * radius + 1) ** 2)
    block_c = min(next_pow2(max(C, 1)), max(1, _track_tile_elems(out_size) // block_q))
    c_split, split = _split(N, max(C, 1), block_c)
    part = new_output((N, split, block_q), torch.float32, feat.device)
    with device_ctx(feat):
        _track_dist_kernel[(N, split)](
            feat, ref, handles, part, C, h, w, H2, W2, c_split,
            RADIUS=radius, TAPS=2 if out_size is None else 4, BLOCK_C=block_c, BLOCK_Q=block_q, num_warps=4)
        _track_select_kernel[(N,)](
            part, handles, targets, out, H2, W2, split,
            RADIUS=radius, CLOSER=bool(closer_only), BLOCK_Q=block_q, num_warps=4)
    return out


@torch.library.custom_op("fastdrag::track", mutates_args=())
def _track_op(feat: torch.Tensor, ref: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, radius: int,
              out_size: Optional[list[int]], closer_only: bool) -> torch.Tensor:
    if feat.dtype in KERNEL_DTYPES and use_triton(feat, ref, handles, targets):
        return _track_triton(feat, ref, handles, targets, radius, out_size, closer_only)
    return reference.track(feat, ref, handles, targets, radius, out_size=as_tuple(out_size),
                           closer_only=closer_only)


@_track_op.register_fake
def _(feat, ref, handles, targets, radius, out_size, closer_only):
    return handles.new_empty((handles.shape[0], 2))


def track(feat: torch.Tensor, ref: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, radius: int, *,
          out_size: tuple[int, int] | None = None, closer_only: bool = False) -> torch.Tensor:
    """Move each handle to the window point whose features best match its reference (L1 over channels).

    Args:
        feat: [C, h, w] current features (float32 / bfloat16 / float16).
        ref: [N, C] reference features (F0 at the initial handles), any float dtype (compared in fp32).
        handles, targets: [N, 2] (row, col) on the grid of the searched map; handles are rounded (half to
            even) to integers first, as in the reference.
        radius: the search covers the integer window handle +- radius, clipped to the map.
        out_size: optional (H2, W2); the searched map is then the bilinear (align_corners=False) upsample
            of `feat`, evaluated only at the window points.
        closer_only: CLIPDrag's fast point tracking: only q with |q - g|^2 < |h - g|^2 compete; a handle
            with |h - g|^2 <= 1, or with no candidate left, stays put.

    Returns:
        [N, 2] new handles, dtype of `handles`: ``argmin_q sum_c |ref[i, c] - F(q)[c]|`` with the first
        minimum in row-major window order winning ties. Not differentiable. No host synchronization.

    Example:
        >>> new = track(feat, f0_at_handles, handles, targets, 3, out_size=(256, 256), closer_only=True)
    """
    if feat.dim() != 3 or ref.dim() != 2 or handles.dim() != 2 or handles.shape[-1] != 2:
        raise ValueError("track expects feat [C, h, w], ref [N, C], handles/targets [N, 2]")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    # Tracking is a discrete search: detach so the (gradient-free) op never sees autograd inputs.
    return torch.ops.fastdrag.track(feat.detach(), ref.detach(), handles.detach(), targets.detach(),
                                    int(radius), norm_out_size(feat, out_size), bool(closer_only))
