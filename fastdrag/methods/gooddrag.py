"""GoodDrag (spec gooddrag): Alternating Drag and Denoising (AlDD) with Information-Preserving Motion
Supervision (IPMS), and its DragText port (cfg.optimize_text, spec dragtext A5, the GoodDrag column).

What differs from DragDiffusion:
- the drag is spread over the first `drag_end_step` denoising timesteps (741, 721, ..., 621 by default); each
  gets a fresh Adam, `track_per_step` (B) drag operations of `max_drag_per_track` (J) Adam steps, each followed
  by one tracking update, and then one plain DDIM step of the [reference, edited] pair; mutual self-attention
  only starts once dragging has ended (spec 1.4-1.6);
- the motion-supervision reference is the *unedited* trajectory's feature patch at the *initial* handle at the
  current timestep, the moved patch sits at h + d*min(beta, |g - h|), weight (2 r1)^2 (spec 2);
- tracking compares against the unedited feature pixel at the initial handle, radius r2, and is re-run at the
  first iteration of every drag timestep; a counter of consecutive unchanged trackings stops the drag and, as
  in the official code, persists across timesteps (spec 1.5-1.7, 3.3-3.4).

Of the unedited trajectory only what the loss and tracking read is kept (spec 6.3): per drag timestep the r1
patches and the single pixels of F0_t at the initial handles, and z0_{t-1}. It is cached in prep.extras, so an
Editor re-drag of the same image and handles skips it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pipeline import (DragContext, TextLeaf, denoise_pair, loss_mask, mask_term, masked_step, motion_step, reached,
                        term_without_mask)
from . import MethodOutput, register


@dataclass
class RefStep:
    """The unedited trajectory at one drag timestep t, cut to what IPMS and tracking read."""

    patches: torch.Tensor  # [N, C, 2r1+1, 2r1+1]: F0_t around the initial handles
    pixels: torch.Tensor  # [N, C]: F0_t at the initial handles (the tracking reference)
    x_prev: torch.Tensor  # [1, 4, h, w]: z0_{t-1}, the one-step DDIM output of z0_t (the mask term's reference)


@dataclass
class DragState:
    """What carries over from one drag timestep to the next (handles, the no-change counter) and the records."""

    handles: torch.Tensor  # [N, 2] (row, col), integer values
    no_change: int = 0  # consecutive tracking updates that left every handle in place (never reset per timestep)
    stop_reason: str | None = None  # "reached" | "stagnation"; None while dragging, "end" after the last timestep
    n_track: int = 0  # tracking updates after J steps (the ones the no-change counter sees)
    n_retrack: int = 0  # first-iteration re-tracks, one per drag timestep
    losses: list = field(default_factory=list)
    trajectory: list = field(default_factory=list)
    steps_per_timestep: list = field(default_factory=list)
    c_hats: list = field(default_factory=list)
    max_steps: int = 0  # n_drag * B * J, for progress reports


@torch.no_grad()
def reference_trajectory(ctx: DragContext, handles_init: torch.Tensor, n: int) -> list[RefStep]:
    """Denoise the inverted latent without editing through the first n timesteps (fp32 on the reference path;
    the official computes one more step, whose features it never reads). Cached per image preparation."""
    cfg, ops, sched, model = ctx.cfg, ctx.ops, ctx.prep.schedule, ctx.model
    # Everything the result depends on beyond the prepared image: no host sync, handles come from req.points.
    key = ("gooddrag_ref", cfg.unet_feature_idx, tuple(h for h, _ in ctx.req.points), ctx.req.sup_size, cfg.r1, n,
           str(model.dtype), ctx.lazy_upsample)
    if key in ctx.prep.extras:
        return ctx.prep.extras[key]
    z, c = ctx.prep.zt, ctx.prep.text_emb
    out = []
    for i, t in enumerate(ctx.prep.schedule.denoise_timesteps[:n]):
        eps, feat = ctx.unet_features(z, t, c)
        F0, osz = ctx.features(feat)
        z = sched.step(eps, t, z)
        out.append(RefStep(patches=ops.sample_patches(F0, handles_init, cfg.r1, out_size=osz),
                           pixels=ops.sample_patches(F0, handles_init, 0, out_size=osz)[:, :, 0, 0],
                           x_prev=z))
        ctx.reporter("reference", i + 1, n)  # the unedited trajectory IPMS supervises against
    ctx.prep.extras[key] = out
    return out


def drag_phase(ctx: DragContext, st: DragState, *, z_t: torch.Tensor, t: int, c: torch.Tensor, ref: RefStep,
               targets: torch.Tensor, mask: torch.Tensor | None):
    """One AlDD drag phase at timestep t (spec 1.5): B drag operations of J Adam steps + one tracking update.

    Returns (z_t', c_edit): the optimized latent, and the embedding for the edited branch's denoise step at t
    (c, or with cfg.optimize_text the c_hat optimized at this timestep, re-initialised from c).
    """
    cfg, ops, sched, dtype = ctx.cfg, ctx.ops, ctx.prep.schedule, ctx.model.dtype
    stop, r1, r2 = cfg.stop_distance, cfg.r1, cfg.r2
    official = cfg.quirks == "official"  # the released code's mask term and text gradient (docs/deviations.md)
    term_always = term_without_mask(cfg, official)  # official GoodDrag adds the term without a mask too
    with_eps = mask is not None or term_always  # eps is read only by the mask term
    weight = float((2 * r1) ** 2)  # official (2 r1)^2, not the (2 r1 + 1)^2 patch size

    # fp32 leaves whatever the model's dtype (the official optimizes an fp32 latent under fp16 autocast)
    z = z_t.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.latent_lr)  # fresh moments at every drag timestep
    # DragText port: c_hat re-initialised from c, with a fresh Adam, at every drag timestep
    text = TextLeaf(c, cfg, ctx.model.pad_idx(ctx.req.prompt)) if cfg.optimize_text else None

    def retrack(F, osz, handles):
        with torch.no_grad():
            return ops.track(F.detach(), ref.pixels, handles, targets, r2, out_size=osz)

    handles = st.handles
    track_num = cur = steps = 0
    first = True
    done = False
    active = d = None
    while track_num < cfg.track_per_step:
        eps, feat = ctx.unet_features(z.to(dtype), t, c if text is None else text.value.to(dtype),
                                      with_eps=with_eps)
        Fm, osz = ctx.features(feat)
        if first:
            # Re-locate the handles after the previous denoise step, with this forward's features; this update
            # is not a drag operation and leaves the no-change counter alone.
            first = False
            handles = retrack(Fm, osz, handles)
            st.n_retrack += 1
            st.trajectory.append(handles)
        if active is None:
            # Handles change only at tracking updates, so the reach check (a host sync) runs only then.
            done = reached(handles, targets, stop)
            _, active, d = motion_step(handles, targets, stop, cfg.beta)
        if done:
            st.stop_reason = "reached"
            break
        if st.no_change == cfg.max_track_no_change:
            st.stop_reason = "stagnation"
            break
        # IPMS: the unedited F0_t patch at the initial handle vs F1 sampled at h + d (bilinear).
        loss_ms = weight * (active * ops.patch_l1(Fm, ref.patches, handles + d, r1, out_size=osz)).sum()
        loss = loss_ms + cfg.lam * mask_term(sched, eps, t, z, ref.x_prev, mask, always=term_always)
        if text is not None and official:
            # Released DragText, GoodDrag/pipeline.py (gooddrag_step, about L607-611): both grads are zeroed at the
            # top of the iteration, then the latent loss and the text loss are backpropagated in turn, so c_hat's
            # step sees the latent loss's gradient too (z's extra gradient is zeroed before it is used).
            g, g_text = torch.autograd.grad(loss, (z, text.value), retain_graph=True)
            text.update(loss_ms, latent_grad=g_text)
        else:
            (g,) = torch.autograd.grad(loss, z, retain_graph=text is not None)  # the latent loss updates only z
            if text is not None:
                text.update(loss_ms)
        masked_step(opt, z, g)
        st.losses.append(loss_ms.detach())
        steps += 1
        ctx.reporter("drag", sum(st.steps_per_timestep) + steps, st.max_steps, handles=handles)
        cur += 1
        if cur == cfg.max_drag_per_track:
            # Tracking uses Fm from the top of this iteration, i.e. from before this Adam step: the official
            # one-update lag, kept.
            track_num += 1
            cur = 0
            new = retrack(Fm, osz, handles)
            st.no_change = st.no_change + 1 if torch.equal(new, handles) else 0  # host sync, as official
            handles = new
            st.n_track += 1
            st.trajectory.append(handles)
            active = None
    st.handles = handles
    st.steps_per_timestep.append(steps)
    if text is None:
        return z.detach(), c
    st.c_hats.append(text.value.detach())
    return z.detach(), text.value.detach()


@register("gooddrag")
def run(ctx: DragContext) -> MethodOutput:
    model, cfg, prep = ctx.model, ctx.cfg, ctx.prep
    sched = prep.schedule
    timesteps = sched.denoise_timesteps
    n_drag = cfg.drag_end_step  # <= len(timesteps): the config checks it
    handles, targets = ctx.req.feature_points(ctx.device)
    handles_init = handles.clone()
    mask = loss_mask(cfg, ctx.req.latent_mask(tuple(prep.zt.shape[-2:]), ctx.device))
    c = prep.text_emb
    with ctx.reporter.stage("drag"):
        refs = reference_trajectory(ctx, handles_init, n_drag)

    st = DragState(handles=handles, trajectory=[handles_init],
                   max_steps=n_drag * cfg.track_per_step * cfg.max_drag_per_track)
    z_ref, z = prep.zt, prep.zt
    c_edit = c
    drag_ts, plain_ts = [], []
    i = 0
    # AlDD: a drag phase, then one plain DDIM step of [reference, edited] (no mutual attention yet).
    while i < n_drag and st.stop_reason is None:
        if st.no_change == cfg.max_track_no_change:  # stagnation reached at the previous phase's last tracking
            st.stop_reason = "stagnation"
            break
        t = timesteps[i]
        with ctx.reporter.stage("drag"):
            z, c_edit = drag_phase(ctx, st, z_t=z, t=t, c=c, ref=refs[i], targets=targets, mask=mask)
        drag_ts.append(t)
        with ctx.reporter.stage("denoise"):
            z_ref, z = denoise_pair(model, z_ref, z.to(model.dtype), c, c_edit.to(model.dtype), [t], mutual=False,
                                    schedule=sched, graphs=ctx.graph_stages, reporter=ctx.reporter, progress_from=i,
                                    progress_total=len(timesteps))
        plain_ts.append(t)
        i += 1
    if st.stop_reason is None:
        st.stop_reason = "end"
    # The rest with mutual self-attention, registered now (its step counter starts at 0 here); the last c_hat
    # conditions the edited branch.
    rest = timesteps[i:]
    with ctx.reporter.stage("denoise"):
        _, z = denoise_pair(model, z_ref, z, c, c_edit.to(model.dtype), rest, mutual=True,
                            start_step=cfg.start_step, start_layer=cfg.start_layer, schedule=sched,
                            reporter=ctx.reporter, graphs=ctx.graph_stages, progress_from=i,
                            progress_total=len(timesteps))
    trace = {
        "drag_timesteps": drag_ts,
        "plain_denoise_timesteps": plain_ts,
        "mutual_timesteps": list(rest),
        "steps_per_timestep": st.steps_per_timestep,
        "steps": sum(st.steps_per_timestep),
        "ms_loss": torch.stack(st.losses) if st.losses else torch.zeros(0),
        "handles": torch.stack(st.trajectory),
        "handles_init": handles_init,
        "n_trackings": st.n_track,
        "n_retracks": st.n_retrack,
        "no_change_track_num": st.no_change,
        "stop_reason": st.stop_reason,
        "c_edit": c_edit,
    }
    if cfg.optimize_text:
        trace["c_hat"] = st.c_hats
    return MethodOutput(latent=z, handles=st.handles, trace=trace)
