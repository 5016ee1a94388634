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

from ..pipeline import (DragContext, TextLeaf, denoise_pair, mask_term, masked_step, motion_step,
                        reached_on_device)
from . import MethodOutput, register


@dataclass
class LatentResult:
    z: torch.Tensor  # optimized latent (detached)
    c_edit: torch.Tensor  # text embedding for the edited branch (c, or the optimized c_hat)
    handles: torch.Tensor
    trace: dict = field(default_factory=dict)


@torch.no_grad()
def reference_pass(ctx: DragContext, z: torch.Tensor, t: int, c: torch.Tensor):
    """Features and one-step DDIM output of the un-optimized latent: (feat [1,C,h,w], x_prev0). Cached."""
    key = ("ref_pass", ctx.cfg.unet_feature_idx, t, ctx.model.dtype)
    if key not in ctx.prep.extras:
        eps, feat = ctx.unet_features(z, t, c)
        ctx.prep.extras[key] = (feat, ctx.prep.schedule.step(eps, t, z))
    return ctx.prep.extras[key]


def optimize_latent(ctx: DragContext, *, z_init: torch.Tensor, t: int, c: torch.Tensor, feat0: torch.Tensor,
                    x_prev0: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
                    n_steps: int, r_m: int, r_p: int, ms_reference: str = "current", step_cap: float | None = None,
                    closer_only: bool = False, ms_weight: float | None = None,
                    grad_transform: Callable | None = None) -> LatentResult:
    """The DragDiffusion latent loop. Per iteration: one UNet forward -> (from iteration 1 on) track handles
    -> stop if every handle is within stop_distance -> loss -> backward -> Adam.

    ms_reference: "current" (DragDiffusion: sg(F) at the current handle) or "initial" (GoodDrag/CLIPDrag: F0 at
    the initial handle). step_cap: None for a unit step, else min(cap, dist). grad_transform(z, g, step) -> g
    rewrites the latent gradient before the Adam step (CLIPDrag's fusion).
    """
    cfg, ops, sched = ctx.cfg, ctx.ops, ctx.prep.schedule
    stop = cfg.stop_distance
    weight = float((2 * r_m + 1) ** 2) if ms_weight is None else ms_weight
    handles_init = handles.clone()
    F0, osz = ctx.features(feat0)
    f0_ref = ops.sample_patches(F0, handles_init, 0, out_size=osz)[:, :, 0, 0]  # tracking: F0 at the initial handle
    ref_init = ops.sample_patches(F0, handles_init, r_m, out_size=osz) if ms_reference == "initial" else None

    dtype = ctx.model.dtype
    z = z_init.detach().float().clone().requires_grad_(True)  # fp32 leaves whatever the model dtype
    opt = torch.optim.Adam([z], lr=cfg.latent_lr)
    text = TextLeaf(c, cfg, ctx.model.pad_idx(ctx.req.prompt)) if cfg.optimize_text else None
    # The stop flag lives on the device. With check_every = 1 the host reads it every iteration, before the loss,
    # exactly where the official loop breaks. With k > 1 the host reads it every k iterations and a finished run
    # masks its own updates (latent, text, handles), which gives the same result without a sync per step.
    every = cfg.check_every
    done = torch.zeros((), dtype=torch.bool, device=z.device)
    losses, live, trajectory = [], [], [handles.clone()]
    for step in range(n_steps):
        eps, feat = ctx.unet_features(z.to(dtype), t, c if text is None else text.value.to(dtype))
        Fm, osz = ctx.features(feat)
        if step > 0:
            with torch.no_grad():
                tracked = ops.track(Fm.detach(), f0_ref, handles, targets, r_p, out_size=osz, closer_only=closer_only)
                handles = torch.where(done, handles, tracked)
            trajectory.append(handles.clone())
        done = done | reached_on_device(handles, targets, stop)
        if step % every == 0 and bool(done):  # the only host check
            break
        _, active, d = motion_step(handles, targets, stop, step_cap)
        ref = ref_init if ref_init is not None else ops.sample_patches(Fm.detach(), handles, r_m, out_size=osz)
        loss_ms = weight * (active * ops.patch_l1(Fm, ref, handles + d, r_m, out_size=osz)).sum()
        loss = loss_ms + cfg.lam * mask_term(sched, eps, t, z, x_prev0, mask)
        (g,) = torch.autograd.grad(loss, z, retain_graph=text is not None)  # the latent loss updates only z
        if text is not None:
            text.update(loss_ms, done, every)
        if grad_transform is not None:
            g = grad_transform(z, g, step)
        masked_step(opt, z, g, done, every)
        losses.append(loss_ms.detach())
        live.append(~done)
        ctx.reporter("drag", step + 1, n_steps)
    live_t = torch.stack(live) if live else torch.zeros(0, dtype=torch.bool)
    steps_done = int(live_t.sum())
    losses = [l for l, ok in zip(losses, live_t.tolist()) if ok]
    trace = {"ms_loss": torch.stack(losses) if losses else torch.zeros(0), "handles": torch.stack(trajectory),
             "steps": steps_done, "handles_init": handles_init, "f0_ref": f0_ref}
    c_edit = c if text is None else text.value.detach()
    return LatentResult(z=z.detach(), c_edit=c_edit, handles=handles, trace=trace)


def drag_at_edit_timestep(ctx: DragContext, **loop_kwargs) -> MethodOutput:
    """Shared body of DragDiffusion, DragText and CLIPDrag: drag at t_edit, then denoise the pair."""
    model, cfg, prep = ctx.model, ctx.cfg, ctx.prep
    sched = prep.schedule
    t = sched.t_edit
    handles, targets = ctx.req.feature_points(ctx.device)
    mask = ctx.req.latent_mask(tuple(prep.zt.shape[-2:]), ctx.device)
    feat0, x_prev0 = reference_pass(ctx, prep.zt, t, prep.text_emb)
    with ctx.reporter.stage("drag"):
        res = optimize_latent(ctx, z_init=prep.zt, t=t, c=prep.text_emb, feat0=feat0, x_prev0=x_prev0,
                              handles=handles, targets=targets, mask=mask, **loop_kwargs)
    with ctx.reporter.stage("denoise"):
        _, z = denoise_pair(model, prep.zt, res.z.to(model.dtype), prep.text_emb, res.c_edit.to(model.dtype),
                            sched.denoise_timesteps, mutual=True, start_step=cfg.start_step,
                            start_layer=cfg.start_layer, schedule=sched, reporter=ctx.reporter)
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
