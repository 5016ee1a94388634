"""CLIPDrag (spec dragtext_clipdrag B): DragDiffusion's latent loop with GoodDrag-style motion supervision
(step min(beta, dist), F0 reference patch at the initial handle), fast point tracking (only candidates strictly
closer to the target), and, at every iteration, a CLIP text gradient G_g fused with the drag gradient G_l:

    cos = cos(G_l, G_g) over the flattened latent;  G = G_l + lam*sin*G_g if cos >= 0 else G_l + lam*cos*G_g

(fusion="clipdrag", the official code) or the parallel/perpendicular reading (fusion="projection").
The edit prompt only drives CLIP; the UNet keeps the source prompt everywhere (inversion, drag, denoising).
"""

from __future__ import annotations

import warnings

import torch

from ..clip import ClipObjective, global_gradient, load_clip
from ..pipeline import DragContext
from . import MethodOutput, register
from .dragdiffusion import drag_at_edit_timestep


def clip_prompt(ctx: DragContext) -> str:
    """The text CLIP follows: the edit prompt, else the source prompt (official ui_utils); "" if both are empty.
    A whitespace-only edit prompt counts as empty, except with quirks="official"."""
    return _clip_prompt(ctx.cfg, ctx.req.prompt)


def _clip_prompt(cfg, source_prompt: str) -> str:
    edit = cfg.edit_prompt
    if cfg.quirks == "official":
        # Released CLIPDrag, utils/ui_utils.py L220 (HEAD): `drag_prompt if drag_prompt != "" else lora_prompt`,
        # so " " is a prompt of its own.
        return edit if edit != "" else source_prompt
    return edit if edit.strip() else source_prompt


def preflight(model, cfg, req) -> None:
    """Load CLIP (cached for the run) before any UNet pass, so that an unavailable CLIP fails in a second, not after
    the LoRA fit and the inversion. Nothing to load when CLIP will not run (no text to follow, quirks="fixed")."""
    if cfg.quirks == "official" or _clip_prompt(cfg, req.prompt).strip():
        load_clip(cfg.clip_model, model.device, model.dtype)


@register("clipdrag", preflight=preflight)
def run(ctx: DragContext) -> MethodOutput:
    cfg, model, sched = ctx.cfg, ctx.model, ctx.prep.schedule
    prompt = clip_prompt(ctx)
    t, c_src = sched.t_edit, ctx.prep.text_emb

    official = cfg.quirks == "official"
    # quirks="official" follows the bench script (drag_diffusion_update_final @29c1a94, about L678-681), which runs
    # CLIP on whatever prompt it has, "" included; the UI (HEAD drag_utils.py L238: `if args.drag_prompt != ""`)
    # runs no backward at all for an empty one.
    if not official and not prompt.strip():
        # Official UI: no backward runs and the latent never moves (spec B8.1). We drag with G_l alone.
        warnings.warn("clipdrag: the edit prompt and the source prompt are both empty, so CLIP has no text to "
                      "follow; dragging with the local (motion-supervision) gradient alone", UserWarning,
                      stacklevel=3)
        fuse = None
    else:
        objective = ClipObjective.build(cfg.clip_model, prompt, device=ctx.device, dtype=model.dtype,
                                        coef=cfg.clip_loss_coef, official=official)

        def fuse(z: torch.Tensor, g_local: torch.Tensor, records) -> torch.Tensor:
            g_global, loss = global_gradient(model, sched, z, t, c_src, objective)
            gl, gg = g_local.float().flatten(), g_global.float().flatten()
            nl, ng = gl.norm(), gg.norm()
            records.put("clip_loss", loss)
            records.put("clip_cos", torch.where(nl * ng > 0, gl.dot(gg) / (nl * ng).clamp_min(1e-30),
                                                torch.zeros_like(nl)))
            records.put("g_local_norm", nl)
            records.put("g_global_norm", ng)
            return ctx.ops.fuse_gradients(g_local, g_global.to(g_local.dtype), cfg.fuse_cof, rule=cfg.fusion)

    out = drag_at_edit_timestep(ctx, n_steps=cfg.n_pix_step, r_m=cfg.r_m, r_p=cfg.r_p, ms_reference="initial",
                                step_cap=cfg.beta, closer_only=True, grad_transform=fuse,
                                mask_always=official)  # the bench script's mask term, see pipeline.mask_term
    # the loop's trace holds the records per live step: clip_loss, clip_cos, g_local_norm, g_global_norm
    for name in ("clip_loss", "clip_cos", "g_local_norm", "g_global_norm"):
        out.trace.setdefault(name, torch.zeros(0))
    out.trace.update(clip_prompt=prompt, clip_used=fuse is not None, fusion=cfg.fusion, fuse_cof=cfg.fuse_cof)
    return out
