"""GoodDrag (method="gooddrag") and its DragText port (optimize_text=True) on the tiny model, CPU.

Spec: ../shared/spec/gooddrag.md (1.4-1.7, 2, 3, 4.3) and dragtext_clipdrag.md A5. The tiny random UNet is
chaotic at 64x64, so images are 128x128 (a 64x64 supervision grid). Most edits skip the LoRA fit and keep the
real schedule (DDIM 50, strength 0.75) with few drag operations per timestep.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdrag
from fastdrag.ddim import Schedule
from fastdrag.kernels import reference as ref_ops
from fastdrag.methods import METHODS, _load_all
from fastdrag.methods import gooddrag as gd
from fastdrag.model import make_scheduler
from fastdrag.unet import UNetFeatures

from .conftest import spy_text_updates_and_mask_terms

DRAG_TS = [741, 721, 701, 681, 661, 641, 621]
# one pair, 24 supervision px from handle (row 32, col 20) to target (row 32, col 44), far from the border
POINTS = [((40, 64), (88, 64))]
# Tests of the drag phase use a short tail (strength 0.16: 8 steps, 141 ... 1) to keep the suite quick; the
# schedule test uses the real one.
QUICK = dict(lora_steps=0, max_track_no_change=100, inversion_strength=0.16)
TS = list(range(141, 0, -20))


@contextlib.contextmanager
def spy(mp: pytest.MonkeyPatch, owner, name: str):
    """Record (args, kwargs, result) of every call of owner.name."""
    calls = []
    orig = getattr(owner, name)

    def wrapper(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    mp.setattr(owner, name, wrapper)
    yield calls


class AdamSpy(torch.optim.Adam):
    """torch.optim.Adam that records every instance and the value of its parameter at construction."""

    made: list = []

    def __init__(self, params, **kw):
        params = list(params)
        super().__init__(params, **kw)
        AdamSpy.made.append((self, params[0].detach().clone()))


@pytest.fixture
def adam_spy(monkeypatch):
    AdamSpy.made = []
    monkeypatch.setattr(torch.optim, "Adam", AdamSpy)
    return AdamSpy.made


def capture_ctx(monkeypatch) -> list:
    """Capture the DragContext that the method receives (to reach the prepared latents)."""
    _load_all()
    ctxs = []
    orig = METHODS["gooddrag"]

    def run(ctx):
        ctxs.append(ctx)
        return orig(ctx)

    monkeypatch.setitem(METHODS, "gooddrag", run)
    return ctxs


def edit(editor, img, points=POINTS, **kw):
    return editor.edit(img, points, method="gooddrag", **{**QUICK, **kw})


# ---------------------------------------------------------------------------------------------------------
# Defaults, presets, schedule


def test_defaults_presets_and_schedule():
    cfg = fastdrag.make_config("gooddrag")
    assert (cfg.latent_lr, cfg.lora_steps, cfg.lora_lr, cfg.inversion_strength) == (0.02, 70, 5e-4, 0.75)
    assert (cfg.drag_end_step, cfg.track_per_step, cfg.max_drag_per_track) == (7, 10, 3)
    assert (cfg.r1, cfg.r2, cfg.beta, cfg.stop_distance) == (4, 12, 4.0, 2.0)
    assert (cfg.lam, cfg.max_track_no_change) == (0.2, 10)
    assert (cfg.optimize_text, cfg.text_lr, cfg.text_lam) == (False, 0.004, 0.1)
    ui = fastdrag.make_config("gooddrag", preset="ui")
    bench = fastdrag.make_config("gooddrag", preset="bench")
    assert (ui.lam, ui.max_track_no_change) == (0.2, 10)
    assert (bench.lam, bench.max_track_no_change) == (0.1, 5)
    assert fastdrag.make_config("gooddrag", preset="bench", lam=0.3).lam == 0.3  # overrides beat the preset
    sched = Schedule.make(make_scheduler(), cfg.n_inference_step, cfg.inversion_strength)
    assert sched.n_actual == 38 and sched.t_edit == 741
    ts = list(sched.denoise_timesteps)
    assert ts[: cfg.drag_end_step] == DRAG_TS
    assert ts[cfg.drag_end_step:] == list(range(601, 0, -20))


# ---------------------------------------------------------------------------------------------------------
# AlDD schedule and fresh Adam per timestep: the real schedule (7 drag timesteps), 2 x 1 steps per timestep


@pytest.fixture(scope="module")
def schedule_run(editor, img):
    AdamSpy.made = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim, "Adam", AdamSpy)
        with spy(mp, gd, "denoise_pair") as denoise_calls:
            res = edit(editor, img, inversion_strength=0.75, track_per_step=2, max_drag_per_track=1,
                       latent_lr=1e-3)
    return res, list(AdamSpy.made), denoise_calls


def test_drag_timesteps_then_pure_denoising(schedule_run):
    res, _, denoise_calls = schedule_run
    tr = res.trace
    assert tr["stop_reason"] == "end"
    assert tr["drag_timesteps"] == DRAG_TS
    assert tr["plain_denoise_timesteps"] == DRAG_TS
    assert tr["mutual_timesteps"] == list(range(601, 0, -20))
    assert tr["steps_per_timestep"] == [2] * 7 and tr["ms_loss"].shape == (14,)
    assert tr["n_retracks"] == 7 and tr["n_trackings"] == 14
    # each drag phase is followed by one plain DDIM step of the pair; mutual attention only afterwards
    kinds = [(list(kw_args[5]), kw["mutual"]) for kw_args, kw, _ in denoise_calls]
    assert kinds == [([t], False) for t in DRAG_TS] + [(list(range(601, 0, -20)), True)]
    assert res.image.size == (128, 128)


def test_fresh_adam_per_drag_timestep(schedule_run):
    res, adams, _ = schedule_run
    assert len(adams) == 7  # one per drag timestep, none shared
    params = [opt.param_groups[0]["params"][0] for opt, _ in adams]
    assert len({id(p) for p in params}) == 7
    for (opt, _), n in zip(adams, res.trace["steps_per_timestep"]):
        assert opt.param_groups[0]["lr"] == 1e-3
        assert int(opt.state[opt.param_groups[0]["params"][0]]["step"]) == n == 2  # moments started from zero


# ---------------------------------------------------------------------------------------------------------
# IPMS


def unedited_features(ctx, n):
    """Independent reference: denoise the inverted latent without editing, upsample the full feature map."""
    feats = UNetFeatures(ctx.model.unet, ctx.cfg.unet_feature_idx)
    out, z = [], ctx.prep.zt
    try:
        with torch.no_grad():
            for t in ctx.prep.schedule.denoise_timesteps[:n]:
                eps, feat = feats(z, t, ctx.prep.text_emb)
                out.append(F.interpolate(feat, ctx.req.sup_size, mode="bilinear", align_corners=False)[0])
                z = ctx.prep.schedule.step(eps, t, z)
    finally:
        feats.close()
    return out


def window(fmap, rc, r):
    r0, c0 = int(rc[0]), int(rc[1])
    return fmap[:, r0 - r: r0 + r + 1, c0 - r: c0 + r + 1]


def test_ipms_reference_is_the_unedited_patch_at_the_initial_handle(editor, img, monkeypatch):
    """Tracking is forced to move the handle 1 px per update: the moved patch follows it, the reference does
    not, and the reference is F0 of the unedited trajectory at the current t."""
    ctxs = capture_ctx(monkeypatch)

    def moving_track(feat, ref, handles, targets, radius, **kw):
        return handles + torch.tensor([0.0, 1.0])

    monkeypatch.setattr(ref_ops, "track", moving_track)
    with spy(monkeypatch, ref_ops, "patch_l1") as l1_calls:
        res = edit(editor, img, drag_end_step=3, track_per_step=2, max_drag_per_track=1)
    tr = res.trace
    assert tr["drag_timesteps"] == TS[:3] and tr["steps_per_timestep"] == [2, 2, 2]
    h0 = tr["handles_init"][0]
    assert h0.tolist() == [32.0, 20.0]
    F0 = unedited_features(ctxs[0], 3)
    for k, (args, kw, out) in enumerate(l1_calls):
        i = k // 2  # drag timestep index
        ref, centers, r = args[1], args[2], args[3]
        assert r == 4 and ref.shape[-2:] == (9, 9)
        assert torch.allclose(ref[0], window(F0[i], h0, 4), atol=1e-5)
        # the handle has moved (re-track + 1 per update) but the reference stays at the initial handle
        h = h0 + torch.tensor([0.0, 1.0]) * (1 + 2 * i + k % 2 + i)
        assert torch.equal(centers[0], h + torch.tensor([0.0, 4.0]))
        assert not torch.allclose(ref[0], window(F0[i], h, 4), atol=1e-3)
        # the loss is (2 r1)^2 times the mean L1 (one active point)
        assert torch.allclose(tr["ms_loss"][k], 64 * out[0])
    # recomputed per timestep, not frozen at the first one
    assert not torch.allclose(l1_calls[0][0][1], l1_calls[2][0][1], atol=1e-4)


def test_tracking_reference_and_the_one_update_lag(editor, img, monkeypatch):
    """Tracking compares with the unedited pixel at the initial handle (r2 = 12), and uses the features of the
    forward at the top of its iteration (before that iteration's Adam step): no extra UNet forward."""
    ctxs = capture_ctx(monkeypatch)
    with spy(monkeypatch, UNetFeatures, "forward") as fwd_calls, spy(monkeypatch, ref_ops, "track") as track_calls:
        res = edit(editor, img, drag_end_step=2, track_per_step=2, max_drag_per_track=1)
    assert res.trace["drag_timesteps"] == TS[:2]
    F0 = unedited_features(ctxs[0], 2)
    h0 = res.trace["handles_init"][0].long()
    drag_feats = [out[1] for args, _, out in fwd_calls if args[1].requires_grad]  # the optimized latent
    assert len(drag_feats) == 4  # one forward per Adam step, nothing else
    assert len(track_calls) == 6  # per timestep: the first-iteration re-track + 2 updates
    for k, (args, kw, _) in enumerate(track_calls):
        assert args[4] == 12  # r2
        assert torch.allclose(args[1][0], F0[k // 3][:, h0[0], h0[1]], atol=1e-5)
        i, j = divmod(k, 3)  # re-track and 1st update: forward 0 of the timestep; 2nd update: forward 1
        feat = drag_feats[2 * i + max(j - 1, 0)]
        up = F.interpolate(feat.detach(), ctxs[0].req.sup_size, mode="bilinear", align_corners=False)[0]
        assert torch.equal(args[0], up)


def test_moved_patch_never_overshoots_and_near_points_are_skipped(editor, img, monkeypatch):
    """Handles are pinned (by tracking) at 3, 1 and 10 px from their targets: the step is clipped to the
    distance (center = target), the 1 px point is skipped, the 10 px point steps beta = 4."""
    points = [((40, 64), (88, 64)), ((64, 24), (64, 100)), ((100, 100), (60, 100))]
    pinned = torch.tensor([[32.0, 41.0], [49.0, 32.0], [50.0, 40.0]])  # targets (32,44), (50,32), (50,30)
    targets = torch.tensor([[32.0, 44.0], [50.0, 32.0], [50.0, 30.0]])
    monkeypatch.setattr(ref_ops, "track", lambda feat, ref, handles, tg, r, **kw: pinned.clone())
    with spy(monkeypatch, ref_ops, "patch_l1") as l1_calls:
        res = edit(editor, img, points, drag_end_step=1, track_per_step=2, max_drag_per_track=1)
    assert len(l1_calls) == 2
    for k, (args, kw, out) in enumerate(l1_calls):
        centers = args[2]
        step = (centers - pinned).norm(dim=1)
        assert (step <= (targets - pinned).norm(dim=1) + 1e-6).all()  # never past the target
        assert torch.allclose(centers[0], targets[0])  # 3 px < beta: lands exactly on the target
        assert torch.allclose(centers[2], torch.tensor([50.0, 36.0]))  # 10 px: beta = 4 px
        assert torch.allclose(res.trace["ms_loss"][k], 64 * (out[0] + out[2]))  # the 1 px point is skipped


def test_redrag_with_another_handle_gets_that_handles_reference_trajectory(tiny_model, img):
    """The unedited trajectory is cached per prepared image and keyed on the handles: a re-drag on the same Editor
    with a different handle must not be served the first handle's IPMS patches and tracking pixels, so it gives
    exactly what a fresh Editor gives."""
    other = [((64, 40), (64, 88))]  # handle at supervision (row 20, col 32), 24 px below POINTS' handle
    kw = dict(drag_end_step=2, track_per_step=2, max_drag_per_track=1)
    ed = fastdrag.Editor(tiny_model)
    first = edit(ed, img, POINTS, **kw)
    again = edit(ed, img, other, **kw)
    fresh = edit(fastdrag.Editor(tiny_model), img, other, **kw)
    assert first.trace["handles_init"].tolist() == [[32.0, 20.0]]
    assert again.trace["handles_init"].tolist() == fresh.trace["handles_init"].tolist() == [[20.0, 32.0]]
    assert again.trace["steps_per_timestep"] == fresh.trace["steps_per_timestep"] == [2, 2]
    assert torch.equal(again.trace["ms_loss"], fresh.trace["ms_loss"])
    assert torch.equal(again.trace["handles"], fresh.trace["handles"])
    assert again.image.tobytes() == fresh.image.tobytes()


# ---------------------------------------------------------------------------------------------------------
# Stop rules


def test_stagnation_stops_after_exactly_n_unchanged_trackings_across_timesteps(editor, img, monkeypatch):
    monkeypatch.setattr(ref_ops, "track", lambda feat, ref, handles, tg, r, **kw: handles.clone())
    res = edit(editor, img, drag_end_step=3, track_per_step=2, max_drag_per_track=1, max_track_no_change=3)
    tr = res.trace
    # 1st timestep: 2 steps, 2 unchanged trackings; 2nd: the counter carries over, 1 step + 1 tracking -> 3: stop
    assert tr["stop_reason"] == "stagnation"
    assert tr["n_trackings"] == 3 and tr["no_change_track_num"] == 3
    assert tr["steps_per_timestep"] == [2, 1]
    assert tr["drag_timesteps"] == TS[:2]
    assert tr["mutual_timesteps"] == TS[2:]


def test_stagnation_counter_resets_on_a_move(editor, img, monkeypatch):
    calls = []

    def track(feat, ref, handles, tg, r, **kw):
        calls.append(1)
        return handles + torch.tensor([0.0, 1.0]) if len(calls) == 3 else handles.clone()  # 2nd update moves

    monkeypatch.setattr(ref_ops, "track", track)
    res = edit(editor, img, drag_end_step=2, track_per_step=4, max_drag_per_track=1, max_track_no_change=2)
    tr = res.trace
    # updates: same (1), moved (0), same (1), same (2) -> the phase ends; the next timestep does not drag
    assert tr["steps_per_timestep"] == [4] and tr["n_trackings"] == 4
    assert tr["stop_reason"] == "stagnation" and tr["drag_timesteps"] == TS[:1]
    assert tr["mutual_timesteps"] == TS[1:]


def test_reached_stops_and_keeps_the_partial_latent(editor, img, monkeypatch):
    targets = torch.tensor([[32.0, 44.0]])
    calls = []

    def track(feat, ref, handles, tg, r, **kw):
        calls.append(1)
        return targets + torch.tensor([[0.0, -1.0]]) if len(calls) == 3 else handles.clone()

    monkeypatch.setattr(ref_ops, "track", track)
    res = edit(editor, img, drag_end_step=3, track_per_step=3, max_drag_per_track=1)
    tr = res.trace
    assert tr["stop_reason"] == "reached" and tr["steps_per_timestep"] == [2]
    assert tr["drag_timesteps"] == TS[:1] and tr["plain_denoise_timesteps"] == TS[:1]
    assert tr["mutual_timesteps"] == TS[1:]
    assert res.points == [(86.0, 64.0)]


# ---------------------------------------------------------------------------------------------------------
# DragText port


def test_text_port_resets_c_hat_per_timestep_and_conditions_the_edited_branch(editor, img, adam_spy, monkeypatch):
    ctxs = capture_ctx(monkeypatch)
    with spy(monkeypatch, gd, "denoise_pair") as denoise_calls:
        res = edit(editor, img, prompt="a cat", drag_end_step=3, track_per_step=2, max_drag_per_track=1,
                   optimize_text=True)
    c = ctxs[0].prep.text_emb
    tr = res.trace
    assert tr["drag_timesteps"] == TS[:3]
    text_adams = [(o, v) for o, v in adam_spy if o.param_groups[0]["lr"] == 0.004]
    assert len(text_adams) == 3 and len(adam_spy) == 6
    for opt, init in text_adams:
        assert torch.equal(init, c)  # re-initialised from c at every drag timestep
        assert int(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 2
    assert len(tr["c_hat"]) == 3
    for ch in tr["c_hat"]:
        assert not torch.allclose(ch, c)  # c_hat moved during the drag
    # tokens >= pad_idx are optimized too (free, unregularized); pad_idx = 1 + prompt tokens
    pad = ctxs[0].model.pad_idx("a cat")
    assert 1 < pad < 76 and not torch.allclose(tr["c_hat"][0][:, pad:], c[:, pad:])
    # the reference branch keeps c; the edited branch uses this timestep's c_hat, then the last one
    for (args, kw, _), ch in zip(denoise_calls, tr["c_hat"] + [tr["c_hat"][-1]]):
        assert torch.equal(args[3], c) and torch.equal(args[4], ch)
    assert torch.equal(tr["c_edit"], tr["c_hat"][-1])


def test_text_port_off_is_plain_gooddrag_and_text_grads_do_not_leak(editor, img, adam_spy):
    kw = dict(prompt="a cat", drag_end_step=2, track_per_step=2, max_drag_per_track=2)
    plain = edit(editor, img, **kw)
    assert len(adam_spy) == 2  # no text optimizer
    # c_hat optimized with a vanishing lr stays c: the latent path must then be bit-identical, which also
    # shows that the text backward adds nothing to the latent gradient
    text = edit(editor, img, optimize_text=True, text_lr=1e-30, **kw)
    assert len(adam_spy) == 2 + 4
    assert all(torch.equal(ch, plain.trace["c_edit"]) for ch in text.trace["c_hat"])
    assert torch.equal(text.trace["ms_loss"], plain.trace["ms_loss"])
    assert torch.equal(text.trace["handles"], plain.trace["handles"])
    assert text.image.tobytes() == plain.image.tobytes()


def test_text_port_mask_term_never_reaches_c_hat(editor, img, monkeypatch):
    """Spec dragtext A2 ("The background-mask term is NOT part of L_text. L_text = L_ms + R only") and A5, as
    for DragText on DragDiffusion (the clean port, docs/deviations.md): with a mask and lam > 0, c_hat's update
    differentiates that step's IPMS term alone, bit for bit, while the mask term it leaves out is non-zero."""
    seen, mask_terms = spy_text_updates_and_mask_terms(monkeypatch, gd)
    mask = np.zeros((128, 128), np.uint8)
    mask[20:110, 10:120] = 1
    res = edit(editor, img, mask=mask, prompt="a cat", lam=0.2, optimize_text=True, drag_end_step=2,
               track_per_step=2, max_drag_per_track=1)
    ms = res.trace["ms_loss"]
    assert res.trace["steps_per_timestep"] == [2, 2] and len(seen) == len(mask_terms) == len(ms) == 4
    assert min(mask_terms[1:]) > 1e-3  # z moved from the unedited latent: the mask term is live
    torch.testing.assert_close(torch.stack(seen), ms, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# API


def test_edit_api_with_lora_and_reference_reuse(tiny_model, img, monkeypatch):
    kw = dict(method="gooddrag", model=tiny_model, lora_steps=4, inversion_strength=0.16, drag_end_step=2,
              track_per_step=2, max_drag_per_track=1, preset="bench")
    with spy(monkeypatch, ref_ops, "sample_patches") as calls:
        res = fastdrag.edit(img, POINTS, **kw)
        n_first = sum(1 for args, _, _ in calls if args[2] == 0)
        again = fastdrag.edit(img, POINTS, **kw)
        n_second = sum(1 for args, _, _ in calls if args[2] == 0) - n_first
    assert res.image.size == (128, 128) and len(res.points) == 1
    assert res.method == "gooddrag" and res.config.lam == 0.1 and res.config.max_track_no_change == 5
    assert set(res.timings) >= {"lora", "invert", "drag", "denoise", "decode", "total"}
    assert res.trace["drag_timesteps"] == TS[:2]
    # the unedited-trajectory pixels are computed once per drag timestep, then reused by the re-drag
    assert (n_first, n_second) == (2, 0)
    assert again.image.tobytes() == res.image.tobytes()
