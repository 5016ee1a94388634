"""DragDiffusion (spec dragdiffusion 1.6): optimize the inverted latent z_t at one timestep with motion
supervision and point tracking, then denoise [z_t, z_t'] with mutual self-attention.

`optimize_latent` is the loop that DragText and CLIPDrag reuse: it takes the choices that differ between
them (which reference patch, the step length, constrained tracking, a gradient transform) as arguments.
With cfg.optimize_text it also optimizes the text embedding (DragText, spec dragtext A).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..compile import capture_graph, graph_warmup
from ..pipeline import (DragContext, TextLeaf, denoise_pair, loss_mask, mask_term, masked_step, motion_step,
                        reached_on_device, term_without_mask)
from . import MethodOutput, register


@dataclass
class LatentResult:
    z: torch.Tensor  # optimized latent (detached)
    c_edit: torch.Tensor  # text embedding for the edited branch (c, or the optimized c_hat)
    handles: torch.Tensor
    trace: dict = field(default_factory=dict)
    reference: tuple | None = None  # (feat0, x_prev0) taken from iteration 0's forward (optimize_latent's feat0=None)


def _ref_key(ctx: DragContext, t: int) -> tuple:
    return ("ref_pass", ctx.cfg.unet_feature_idx, t, ctx.model.dtype)


def cached_reference(ctx: DragContext, t: int, need_x_prev: bool):
    """The un-optimized latent's (feat [1,C,h,w], x_prev0 or None) from an earlier drag of the prepared image, or
    None. There is no separate reference pass: a first drag takes it from its iteration 0, whose forward has the
    same inputs (optimize_latent with feat0=None). x_prev0, the one-step DDIM output the mask term compares with,
    exists only where a drag with a mask term computed it."""
    ref = ctx.prep.extras.get(_ref_key(ctx, t))
    if ref is None or (need_x_prev and ref[1] is None):
        return None
    return ref


class StepRecords:
    """Per-iteration records of a drag loop, written into preallocated device buffers at the iteration counter
    `i` (a device tensor), so that recording needs no host sync and a captured CUDA graph records on replay.
    A series' buffer is allocated at its first put (an eager iteration, before any capture)."""

    def __init__(self, n_steps: int, device):
        self.n = n_steps
        self.i = torch.zeros((), dtype=torch.long, device=device)
        self.buffers: dict[str, torch.Tensor] = {}

    def put(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.zeros((self.n,) + tuple(value.shape), dtype=value.dtype,
                                                   device=value.device)
        buf.index_copy_(0, self.i.view(1), value[None].to(buf.dtype))

    def series(self, name: str, iters: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The first `iters` records of `name` (those where `keep`, if given); empty if it was never recorded."""
        buf = self.buffers.get(name)
        if buf is None:
            return torch.zeros(0)
        out = buf[:iters]
        return out if keep is None else out[keep]


class LatentLoop:
    """The state of one latent optimization, on the device and updated in place, and its iteration split in two:
    head (UNet forward, tracking, the stop flag) and tail (loss, backward, masked Adam steps, records). The eager
    driver reads the stop flag between the two, exactly where the official loop breaks; a CUDA graph captures
    head + tail as one step, whose updates are masked once the flag is up. Neither half reads anything on the host.
    """

    def __init__(self, ctx: DragContext, *, z_init, t, c, feat0, x_prev0, handles, targets, mask, n_steps: int,
                 r_m: int, r_p: int, ms_reference: str, step_cap, closer_only: bool, ms_weight,
                 grad_transform, mask_updates: bool, capturable: bool, mask_always: bool = False):
        cfg, ops = ctx.cfg, ctx.ops
        self.ctx, self.t, self.c, self.x_prev0, self.targets, self.mask = ctx, t, c, x_prev0, targets, mask
        self.r_m, self.r_p, self.step_cap, self.closer_only = r_m, r_p, step_cap, closer_only
        self.grad_transform, self.mask_updates = grad_transform, mask_updates
        self.mask_always = term_without_mask(cfg, mask_always)
        self.with_eps = mask is not None or self.mask_always  # eps is read only by the mask term
        self.weight = float((2 * r_m + 1) ** 2) if ms_weight is None else ms_weight
        self.handles_init = handles.clone()
        self.handles = handles.clone()  # updated in place
        self.ms_reference, self.z_init, self.feat0 = ms_reference, z_init, feat0
        self.f0_ref = self.ref_init = None
        if feat0 is not None:
            self._set_reference(feat0)
        self.z = z_init.detach().float().clone().requires_grad_(True)  # fp32 leaf whatever the model dtype
        self.opt = torch.optim.Adam([self.z], lr=cfg.latent_lr, capturable=capturable)
        self.text = TextLeaf(c, cfg, ctx.model.pad_idx(ctx.req.prompt), capturable=capturable) \
            if cfg.optimize_text else None
        # quirks="official": the text backward's gradient on z, which the next iteration's latent step adds
        self.stale = torch.zeros_like(self.z) if self.text is not None and cfg.quirks == "official" else None
        self.done = torch.zeros((), dtype=torch.bool, device=self.z.device)
        self.rec = StepRecords(n_steps, self.z.device)
        self._Fm = self._eps = self._osz = None

    def _set_reference(self, feat0: torch.Tensor) -> None:
        ops = self.ctx.ops
        F0, osz = self.ctx.features(feat0)
        self.f0_ref = ops.sample_patches(F0, self.handles_init, 0, out_size=osz)[:, :, 0, 0]  # tracking: F0 at h0
        self.ref_init = ops.sample_patches(F0, self.handles_init, self.r_m, out_size=osz) \
            if self.ms_reference == "initial" else None

    def head(self, track: bool) -> None:
        ctx, dtype = self.ctx, self.ctx.model.dtype
        c = self.c if self.text is None else self.text.value.to(dtype)
        # eps is read only by the mask term: without it the pass stops after the feature block
        self._eps, feat = ctx.unet_features(self.z.to(dtype), self.t, c, with_eps=self.with_eps)
        if self.feat0 is None:
            # Iteration 0 without a cached reference: this forward's inputs are the un-optimized latent, t and c,
            # those of the reference pass, so its outputs are the reference (no second forward).
            self.feat0 = feat.detach()
            if self.with_eps:
                self.x_prev0 = ctx.prep.schedule.step(self._eps.detach(), self.t, self.z_init)
            self._set_reference(self.feat0)
        self._Fm, self._osz = ctx.features(feat)
        if track:
            with torch.no_grad():
                tracked = ctx.ops.track(self._Fm.detach(), self.f0_ref, self.handles, self.targets, self.r_p,
                                        out_size=self._osz, closer_only=self.closer_only)
                self.handles.copy_(torch.where(self.done, self.handles, tracked))
        self.done |= reached_on_device(self.handles, self.targets, self.ctx.cfg.stop_distance)
        self.rec.put("handles", self.handles)

    def tail(self) -> None:
        ctx, ops, Fm, osz, handles = self.ctx, self.ctx.ops, self._Fm, self._osz, self.handles
        done = self.done if self.mask_updates else None
        _, active, d = motion_step(handles, self.targets, ctx.cfg.stop_distance, self.step_cap)
        ref = self.ref_init if self.ref_init is not None else \
            ops.sample_patches(Fm.detach(), handles, self.r_m, out_size=osz)
        loss_ms = self.weight * (active * ops.patch_l1(Fm, ref, handles + d, self.r_m, out_size=osz)).sum()
        loss = loss_ms + ctx.cfg.lam * mask_term(ctx.prep.schedule, self._eps, self.t, self.z, self.x_prev0,
                                                 self.mask, always=self.mask_always)
        if self.stale is not None:
            # Released DragText, DragDiffusion/utils/drag_utils.py L174-183: the latent loss's backward also fills
            # c_hat.grad, which the text step then uses; the text backward (L180) refills z.grad after the latent
            # optimizer's zero_grad (L178), so the next latent step adds it; and L165-166 add the regularization
            # inside the per-handle loop, once per active handle.
            g, g_text = torch.autograd.grad(loss, (self.z, self.text.value), retain_graph=True)
            g = g + self.stale
            self.stale.copy_(self.text.update(loss_ms, done, latent_grad=g_text, reg_times=active.sum(), z=self.z))
        else:
            (g,) = torch.autograd.grad(loss, self.z, retain_graph=self.text is not None)  # the latent loss: z only
            if self.text is not None:
                self.text.update(loss_ms, done)
        if self.grad_transform is not None:
            g = self.grad_transform(self.z, g, self.rec)
        masked_step(self.opt, self.z, g, done)
        self.rec.put("ms_loss", loss_ms)
        self.rec.put("live", ~self.done)
        self.rec.i += 1
        self._Fm = self._eps = None  # the graph of this iteration can go

    def iteration(self) -> None:
        """head + tail, with tracking: the step a CUDA graph captures."""
        self.head(track=True)
        self.tail()


def optimize_latent(ctx: DragContext, *, z_init: torch.Tensor, t: int, c: torch.Tensor,
                    feat0: torch.Tensor | None, x_prev0: torch.Tensor | None, handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
                    n_steps: int, r_m: int, r_p: int, ms_reference: str = "current", step_cap: float | None = None,
                    closer_only: bool = False, ms_weight: float | None = None,
                    grad_transform: Callable | None = None, mask_always: bool = False) -> LatentResult:
    """The DragDiffusion latent loop. Per iteration: one UNet forward -> (from iteration 1 on) track handles
    -> stop if every handle is within stop_distance -> loss -> backward -> Adam.

    feat0, x_prev0: the un-optimized latent's features and one-step DDIM output (cached_reference), or None: then
    iteration 0's forward provides them, returned in LatentResult.reference. mask: None when the loss has no mask
    term (pipeline.loss_mask); the UNet pass then stops after the feature block.
    ms_reference: "current" (DragDiffusion: sg(F) at the current handle) or "initial" (GoodDrag/CLIPDrag: F0 at
    the initial handle). step_cap: None for a unit step, else min(cap, dist). grad_transform(z, g, records) -> g
    rewrites the latent gradient before the Adam step (CLIPDrag's fusion); it may records.put(name, tensor).
    mask_always: add the mask term without a mask too (pipeline.mask_term; CLIPDrag with quirks="official").

    The stop flag lives on the device. With check_every = 1 the host reads it every iteration, before the loss,
    exactly where the official loop breaks. With k > 1 the host reads it every k iterations and a finished run
    masks its own updates (latent, text, handles), which gives the same result without a sync per step. With
    ctx.cuda_graph the first two iterations run eagerly (they are the warm-up) and the rest replay one captured
    graph of a whole iteration.
    """
    every = ctx.cfg.check_every
    graph_on = ctx.cuda_graph and n_steps > 2
    loop = LatentLoop(ctx, z_init=z_init, t=t, c=c, feat0=feat0, x_prev0=x_prev0, handles=handles,
                      targets=targets, mask=mask, n_steps=n_steps, r_m=r_m, r_p=r_p, ms_reference=ms_reference,
                      step_cap=step_cap, closer_only=closer_only, ms_weight=ms_weight,
                      grad_transform=grad_transform, mask_updates=every > 1 or graph_on,
                      capturable=graph_on and z_init.is_cuda, mask_always=mask_always)
    graph = None
    iters = 0
    with graph_warmup(graph_on, z_init.device):
        for step in range(n_steps):
            iters += 1
            if graph is None:
                loop.head(track=step > 0)
            else:
                graph.replay()
            if step % every == 0 and bool(loop.done):  # the only host read
                break
            if graph is None:
                loop.tail()
                if graph_on and step == 1:
                    graph = capture_graph(loop.iteration)
            ctx.reporter("drag", step + 1, n_steps, handles=loop.handles)
    rec = loop.rec
    live = rec.series("live", iters) if "live" in rec.buffers else torch.zeros(0, dtype=torch.bool)
    per_live_step = (set(rec.buffers) | {"ms_loss"}) - {"handles", "live"}  # ms_loss: empty if no tail ran
    trace = {name: rec.series(name, len(live), live) for name in per_live_step}
    trace.update(handles=rec.series("handles", iters), steps=int(live.sum()), handles_init=loop.handles_init,
                 f0_ref=loop.f0_ref, cuda_graph=graph is not None)
    c_edit = c if loop.text is None else loop.text.value.detach()
    reference = (loop.feat0, loop.x_prev0) if feat0 is None and loop.feat0 is not None else None
    return LatentResult(z=loop.z.detach(), c_edit=c_edit, handles=loop.handles.clone(), trace=trace,
                        reference=reference)


def drag_at_edit_timestep(ctx: DragContext, **loop_kwargs) -> MethodOutput:
    """Shared body of DragDiffusion, DragText and CLIPDrag: drag at t_edit, then denoise the pair."""
    model, cfg, prep = ctx.model, ctx.cfg, ctx.prep
    sched = prep.schedule
    t = sched.t_edit
    handles, targets = ctx.req.feature_points(ctx.device)
    mask = loss_mask(cfg, ctx.req.latent_mask(tuple(prep.zt.shape[-2:]), ctx.device))
    need_x_prev = mask is not None or term_without_mask(cfg, loop_kwargs.get("mask_always", False))
    feat0, x_prev0 = cached_reference(ctx, t, need_x_prev=need_x_prev) or (None, None)
    with ctx.reporter.stage("drag"):
        res = optimize_latent(ctx, z_init=prep.zt, t=t, c=prep.text_emb, feat0=feat0, x_prev0=x_prev0,
                              handles=handles, targets=targets, mask=mask, **loop_kwargs)
    if res.reference is not None:
        prep.extras[_ref_key(ctx, t)] = res.reference
    with ctx.reporter.stage("denoise"):
        _, z = denoise_pair(model, prep.zt, res.z.to(model.dtype), prep.text_emb, res.c_edit.to(model.dtype),
                            sched.denoise_timesteps, mutual=True, start_step=cfg.start_step,
                            start_layer=cfg.start_layer, schedule=sched, reporter=ctx.reporter,
                            graphs=ctx.graph_stages)
    res.trace.update(c_edit=res.c_edit, z_dragged=res.z)
    return MethodOutput(latent=z, handles=res.handles, trace=res.trace)


@register("dragdiffusion")
def run(ctx: DragContext) -> MethodOutput:
    cfg = ctx.cfg
    return drag_at_edit_timestep(ctx, n_steps=cfg.n_pix_step, r_m=cfg.r_m, r_p=cfg.r_p)


@register("dragtext")
def run_dragtext(ctx: DragContext) -> MethodOutput:
    """DragText = DragDiffusion with the text embedding optimized alongside (cfg.optimize_text is True)."""
    return run(ctx)
