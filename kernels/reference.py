"""Plain-PyTorch references for the three hot-loop ops.

These are the oracle for the Triton kernels, the CPU path and the benchmark baseline. They are written
for obviousness, not speed: the optional 64->256 feature upsample is materialized in full with
`F.interpolate`, exactly as the official DragDiffusion/GoodDrag code does every step.

Conventions shared by every op:
- a feature map `feat` is [C, h, w]; points are [N, 2] float tensors in (row, col) order;
- `out_size=(H2, W2)` means "the map is `F.interpolate(feat[None], out_size, mode="bilinear",
  align_corners=False)[0]`", and every coordinate is on that upsampled grid;
- sampling is bilinear with coordinates clamped to the map (replicate border). The official code lets
  indices wrap or slices shrink at the border; docs/deviations.md records that we clamp.
- nothing here synchronizes with the host, so each op can sit inside a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["upsample", "sample_patches", "patch_l1", "track", "fuse_gradients"]


def upsample(feat: torch.Tensor, out_size: tuple[int, int] | None) -> torch.Tensor:
    """[C, h, w] -> [C, H2, W2], bilinear, align_corners=False (the official feature resize)."""
    if out_size is None or tuple(out_size) == tuple(feat.shape[-2:]):
        return feat
    return F.interpolate(feat[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]


def _offsets(radius: int, device) -> torch.Tensor:
    """[(2r+1)^2, 2] integer (row, col) offsets in row-major order."""
    r = torch.arange(-radius, radius + 1, device=device)
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2)


def _bilinear_at(fmap: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Sample fmap [C, H, W] at fractional points pts [..., 2] (row, col), clamped. Returns [C, ...]."""
    H, W = fmap.shape[-2:]
    y = pts[..., 0].clamp(0, H - 1)
    x = pts[..., 1].clamp(0, W - 1)
    y0 = y.floor()
    x0 = x.floor()
    wy = (y - y0).to(fmap.dtype)
    wx = (x - x0).to(fmap.dtype)
    y0 = y0.long()
    x0 = x0.long()
    y1 = (y0 + 1).clamp(max=H - 1)
    x1 = (x0 + 1).clamp(max=W - 1)
    flat = fmap.reshape(fmap.shape[0], -1)

    def tap(yy, xx):
        return flat[:, (yy * W + xx).reshape(-1)].reshape(fmap.shape[0], *yy.shape)

    return ((1 - wy) * (1 - wx)) * tap(y0, x0) + ((1 - wy) * wx) * tap(y0, x1) \
        + (wy * (1 - wx)) * tap(y1, x0) + (wy * wx) * tap(y1, x1)


def sample_patches(feat: torch.Tensor, centers: torch.Tensor, radius: int, *,
                   out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear patches of the (optionally upsampled) map around fractional centers.

    feat [C, h, w]; centers [N, 2] (row, col). Returns [N, C, 2r+1, 2r+1] where element (i, c, a, b) is the
    map sampled at (centers[i,0] + a - r, centers[i,1] + b - r), coordinates clamped to the map.
    Differentiable w.r.t. feat.
    """
    fmap = upsample(feat, out_size)
    k = 2 * radius + 1
    pts = centers[:, None, :].to(torch.float32) + _offsets(radius, feat.device)[None].to(torch.float32)
    vals = _bilinear_at(fmap, pts)  # [C, N, k*k]
    return vals.permute(1, 0, 2).reshape(centers.shape[0], feat.shape[0], k, k)


def patch_l1(feat: torch.Tensor, ref_patches: torch.Tensor, centers: torch.Tensor, radius: int, *,
             out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-point mean |ref - sample| over C x (2r+1)^2: [N]. Computed in fp32 (as F.l1_loss under autocast)."""
    patches = sample_patches(feat, centers, radius, out_size=out_size)
    return (ref_patches.float() - patches.float()).abs().flatten(1).mean(1)


def track(feat: torch.Tensor, ref: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, radius: int, *,
          out_size: tuple[int, int] | None = None, closer_only: bool = False) -> torch.Tensor:
    """Windowed L1 nearest neighbour of `ref` around each handle.

    feat [C, h, w]; ref [N, C] (F0 at the initial handles); handles, targets [N, 2] with integer values.
    Candidates: the integer window handle +- radius, clipped to the map. Distance sum_c |ref - F(q)|; the first
    minimum in row-major order wins. closer_only (CLIPDrag's fast point tracking): only q with
    |q-g|^2 < |h-g|^2 compete; a handle with |h-g|^2 <= 1, or with no candidate left, stays put.
    Returns new handles [N, 2] in the dtype of `handles`.
    """
    fmap = upsample(feat, out_size)
    H, W = fmap.shape[-2:]
    h = handles.round().long()
    q = h[:, None, :] + _offsets(radius, feat.device)[None]  # [N, K, 2]
    valid = (q[..., 0] >= 0) & (q[..., 0] < H) & (q[..., 1] >= 0) & (q[..., 1] < W)
    qc = torch.stack((q[..., 0].clamp(0, H - 1), q[..., 1].clamp(0, W - 1)), dim=-1)
    vals = fmap.reshape(fmap.shape[0], -1)[:, qc[..., 0] * W + qc[..., 1]]  # [C, N, K]
    dist = (ref.float().t()[:, :, None] - vals.float()).abs().sum(0)  # [N, K]
    if closer_only:
        g = targets.float()
        dq = ((q.float() - g[:, None]) ** 2).sum(-1)
        dh = ((h.float() - g) ** 2).sum(-1)
        valid = valid & (dq < dh[:, None]) & (dh[:, None] > 1)
    dist = dist.masked_fill(~valid, float("inf"))
    best = dist.argmin(dim=1)  # first minimum: row-major tie-break
    new = q.gather(1, best[:, None, None].expand(-1, 1, 2))[:, 0]
    keep = ~valid.any(dim=1)
    return torch.where(keep[:, None], h, new).to(handles.dtype)


def fuse_gradients(g_local: torch.Tensor, g_global: torch.Tensor, lam: float, *,
                   rule: str = "clipdrag") -> torch.Tensor:
    """CLIPDrag's global-local gradient fusion over the flattened tensors.

    cos = <g_l, g_g> / (|g_l| |g_g|) (0 if either norm is 0), sin = sqrt(max(0, 1 - cos^2)).
    rule="clipdrag" (the official code): cos >= 0 -> g_l + lam*sin*g_g, else g_l + lam*cos*g_g.
    rule="projection" (a parallel/perpendicular reading of the paper), with u = g_l/|g_l|:
      cos >= 0 -> g_l + lam*(g_g - (g_g.u)u), else g_l + lam*(g_g.u)u.
    """
    if rule not in ("clipdrag", "projection"):
        raise ValueError(f"unknown fusion rule {rule!r}; expected 'clipdrag' or 'projection'")
    gl = g_local.float().flatten()
    gg = g_global.float().flatten()
    dot = torch.dot(gl, gg)
    nl = gl.norm()
    ng = gg.norm()
    denom = nl * ng
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
    if rule == "clipdrag":
        sin = (1 - cos * cos).clamp_min(0).sqrt()
        coef = torch.where(cos >= 0, sin, cos)
        out = gl + lam * coef * gg
    else:
        proj = torch.where(nl > 0, dot / (nl * nl).clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
        par = proj * gl  # (g_g.u) u
        out = torch.where(cos >= 0, gl + lam * (gg - par), gl + lam * par)
    return out.reshape(g_local.shape).to(g_local.dtype)
