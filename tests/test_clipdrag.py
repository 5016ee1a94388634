"""CLIPDrag (spec dragtext_clipdrag B): CLIP loading, the global gradient through the VAE decoder, the fusion
rule, fast point tracking, the empty-prompt fallback, presets, and edits through the API (tiny SD + tiny CLIP)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdrag
from fastdrag import ConfigError, ModelLoadError
from fastdrag import clip as clip_mod
from fastdrag import kernels as fast_ops
from fastdrag.ddim import Schedule
from fastdrag.kernels import reference as reference_ops
from fastdrag.methods import clipdrag as clipdrag_mod

from .conftest import smooth_image

# small settings: 3 DDIM steps to invert/denoise (t_edit = 401), a 2-step LoRA, 3 drag steps
CD = dict(lora_steps=2, n_inference_step=5, inversion_strength=0.6, n_pix_step=3, clip_model="tiny")
PTS = [((40, 60), (70, 60)), ((100, 90), (88, 102))]
OPS = [pytest.param(reference_ops, id="reference"), pytest.param(fast_ops, id="fastdrag.kernels")]


@pytest.fixture(scope="module")
def local_only(editor, image_module):
    """z after the drag with lam = 0 (G = G_l), source prompt empty, CLIP following "a red ball"."""
    res = editor.edit(image_module, PTS, prompt="", method="clipdrag", edit_prompt="a red ball", fuse_cof=0.0, **CD)
    assert res.trace["clip_used"] is True and res.trace["steps"] == CD["n_pix_step"]
    return res.trace["z_dragged"]


@pytest.fixture(scope="module")
def image_module():
    return smooth_image()


def _prep(editor):
    """The most recently prepared image of the editor (LoRA set, inverted latent)."""
    return next(reversed(editor._prepared.values()))


def _dist(handles, targets):
    return (targets - handles).norm(dim=-1)


# ------------------------------------------------------------------------------------------------------------
# Config and presets


def test_defaults_and_presets():
    ui_default = fastdrag.make_config("clipdrag")
    assert (ui_default.n_pix_step, ui_default.r_m, ui_default.r_p, ui_default.fuse_cof) == (800, 1, 3, 0.7)
    assert (ui_default.clip_loss_coef, ui_default.fusion, ui_default.beta) == (300.0, "clipdrag", 4.0)
    assert ui_default.clip_model == "openai/clip-vit-base-patch16" and ui_default.edit_prompt == ""
    assert (ui_default.latent_lr, ui_default.lam, ui_default.stop_distance) == (0.01, 0.1, 2.0)
    assert (ui_default.inversion_strength, ui_default.n_inference_step, ui_default.lora_steps) == (0.7, 50, 80)
    ui = fastdrag.make_config("clipdrag", preset="ui")
    assert (ui.fuse_cof, ui.r_m, ui.r_p, ui.n_pix_step) == (0.7, 1, 3, 800)
    bench = fastdrag.make_config("clipdrag", preset="bench")
    assert (bench.fuse_cof, bench.r_m, bench.r_p, bench.n_pix_step) == (0.3, 4, 12, 40)
    assert fastdrag.make_config("clipdrag", preset="bench", fuse_cof=0.5).fuse_cof == 0.5


@pytest.mark.parametrize("kw, match", [
    (dict(fusion="bogus"), "fusion"),
    (dict(fuse_cof=-0.1), "fuse_cof"),
    (dict(clip_loss_coef=-1.0), "clip_loss_coef"),
    (dict(beta=0.0), "beta"),
    (dict(clip_model=""), "clip_model"),
    (dict(edit_prompt=3), "edit_prompt"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        fastdrag.make_config("clipdrag", **kw)


# ------------------------------------------------------------------------------------------------------------
# CLIP loading


def test_tiny_clip_is_deterministic_frozen_and_cached():
    model, tok = clip_mod.load_clip("tiny", "cpu", torch.float32)
    assert clip_mod.load_clip("tiny", "cpu", torch.float32)[0] is model  # cached, not rebuilt
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.vision_config.image_size == 224
    again, _ = clip_mod.build_tiny_clip()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert len(tok) == model.config.text_config.vocab_size


def test_clip_loads_from_a_local_folder(tmp_path):
    model, tok = clip_mod.build_tiny_clip()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = clip_mod.load_clip(str(tmp_path), "cpu", torch.float32)
    assert loaded is not model and not any(p.requires_grad for p in loaded.parameters())
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    from fastdrag.model import ALIGN  # own, aligned storage: see test_model's round trip

    assert all(t.data_ptr() % ALIGN == 0 for t in (*loaded.parameters(), *loaded.buffers()))
    assert tok2("a red ball").input_ids == tok("a red ball").input_ids
    # the objective built from the folder equals the tiny one
    o1 = clip_mod.ClipObjective.build("tiny", "a red ball", device="cpu", dtype=torch.float32, coef=300.0)
    o2 = clip_mod.ClipObjective.build(str(tmp_path), "a red ball", device="cpu", dtype=torch.float32, coef=300.0)
    torch.testing.assert_close(o1.text_embeds, o2.text_embeds)


def test_clip_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load CLIP model"):
        clip_mod.load_clip(str(tmp_path / "no_such_clip"), "cpu")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        clip_mod.load_clip(str(tmp_path / "weights.bin"), "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="could not load CLIP model"):
        clip_mod.load_clip(str(empty), "cpu")


# ------------------------------------------------------------------------------------------------------------
# The global gradient G_g


@pytest.fixture(scope="module")
def gg_setup(tiny_model):
    sched = Schedule.make(tiny_model.scheduler, 50, 0.7)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 16, 16, generator=g)
    c = tiny_model.encode_prompt("a photo")
    obj = clip_mod.ClipObjective.build("tiny", "a red ball", device="cpu", dtype=torch.float32, coef=300.0)
    return sched, z, c, obj


def test_global_gradient_is_nonzero_and_flows_through_the_vae_decoder(tiny_model, gg_setup):
    sched, z, c, obj = gg_setup
    assert sched.t_edit == 681
    seen = []
    h = tiny_model.vae.decoder.register_forward_hook(
        lambda m, a, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    try:
        g, loss = clip_mod.global_gradient(tiny_model, sched, z, sched.t_edit, c, obj)
    finally:
        h.remove()
    assert seen == [(True, True)]  # the decoder ran once, building a graph
    assert g.shape == z.shape and torch.isfinite(g).all() and g.norm() > 0
    assert 0 <= float(loss) <= 600 and not z.requires_grad
    # cut the decoder's output off the graph: G_g must vanish, so all of it flows through the decoder
    h = tiny_model.vae.decoder.register_forward_hook(lambda m, a, out: out * 0)
    try:
        g0, _ = clip_mod.global_gradient(tiny_model, sched, z, sched.t_edit, c, obj)
    finally:
        h.remove()
    assert torch.count_nonzero(g0) == 0


def test_clip_input_is_normalized_once(tiny_model, gg_setup):
    """The CLIP pixels are mean/std(avgpool_224(clamp(dec/2 + .5))): no second (x+1)/2 (the official quirk)."""
    sched, z, c, obj = gg_setup
    cap = {}
    h1 = tiny_model.vae.decoder.register_forward_hook(lambda m, a, out: cap.__setitem__("dec", out.detach()))
    h2 = obj.model.vision_model.register_forward_pre_hook(
        lambda m, a, kw: cap.__setitem__("pix", (kw.get("pixel_values") if kw.get("pixel_values") is not None
                                                 else a[0]).detach()), with_kwargs=True)
    try:
        clip_mod.global_gradient(tiny_model, sched, z, sched.t_edit, c, obj)
    finally:
        h1.remove()
        h2.remove()
    x = (cap["dec"] / 2 + 0.5).clamp(0, 1)
    assert x.shape[-1] == 128
    x = F.adaptive_avg_pool2d(x, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[None, :, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[None, :, None, None]
    torch.testing.assert_close(cap["pix"], (x - mean) / std)
    assert cap["pix"].shape == (1, 3, 224, 224)


def test_global_gradient_is_the_gradient_of_an_independent_clip_loss():
    """Float64: an independent re-implementation of 300*(1 - cos) agrees with the loss, and its central finite
    difference along G_g equals |G_g| (so G_g is d loss / d z, through UNet x0-prediction, VAE and CLIP)."""
    model = fastdrag.load_model("tiny", device="cpu", dtype=torch.float64)
    sched = Schedule.make(model.scheduler, 50, 0.7)
    t = sched.t_edit
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c = model.encode_prompt("a photo")
    obj = clip_mod.ClipObjective.build("tiny", "a red ball", device="cpu", dtype=torch.float64, coef=300.0)
    clip_model, tok = clip_mod.load_clip("tiny", "cpu", torch.float64)

    @torch.no_grad()
    def loss_indep(zz):
        eps = model.unet(zz, t, encoder_hidden_states=c).sample
        a = model.scheduler.alphas_cumprod[t].double()
        x0 = (zz - (1 - a).sqrt() * eps) / a.sqrt()
        img = (model.vae.decode(x0 / 0.18215).sample / 2 + 0.5).clamp(0, 1)
        img = F.interpolate(img, (224, 224), mode="area")  # torch's "area" resize is the adaptive average pool
        mean = torch.tensor(clip_mod.CLIP_MEAN, dtype=torch.float64)[None, :, None, None]
        std = torch.tensor(clip_mod.CLIP_STD, dtype=torch.float64)[None, :, None, None]
        out = clip_model.vision_model(pixel_values=(img - mean) / std)
        ie = clip_model.visual_projection(out.pooler_output)
        ids = tok(["a red ball"], return_tensors="pt").input_ids
        te = clip_model.text_projection(clip_model.text_model(input_ids=ids).pooler_output)
        return 300 * (1 - F.cosine_similarity(ie, te)[0])

    g, loss = clip_mod.global_gradient(model, sched, z, t, c, obj)
    assert math.isclose(float(loss), float(loss_indep(z)), rel_tol=1e-9, abs_tol=1e-9)
    u = g / g.norm()
    h = 1e-4
    fd = (loss_indep(z + h * u) - loss_indep(z - h * u)) / (2 * h)
    assert math.isclose(float(fd), float(g.norm()), rel_tol=1e-4), (float(fd), float(g.norm()))


# ------------------------------------------------------------------------------------------------------------
# Fusion


def _vectors(sign: int, n=256, seed=0):
    """g_l and g_g with cos(g_l, g_g) of the given sign (|cos| ~ 0.6), float64 numpy."""
    rng = np.random.default_rng(seed)
    gl = rng.normal(size=n)
    perp = rng.normal(size=n)
    perp -= perp @ gl / (gl @ gl) * gl
    gg = 3.0 * (sign * 0.6 * gl / np.linalg.norm(gl) + 0.8 * perp / np.linalg.norm(perp))
    return gl, gg


def _fuse_closed_form(gl, gg, lam, rule):
    nl, ng = np.linalg.norm(gl), np.linalg.norm(gg)
    cos = 0.0 if nl * ng == 0 else float(gl @ gg / (nl * ng))
    if rule == "clipdrag":
        return gl + lam * (math.sqrt(1 - cos * cos) if cos >= 0 else cos) * gg
    u = gl / nl if nl > 0 else np.zeros_like(gl)
    par = (gg @ u) * u
    return gl + lam * (gg - par) if cos >= 0 else gl + lam * par


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("rule", ["clipdrag", "projection"])
@pytest.mark.parametrize("sign", [1, -1])
def test_fusion_matches_the_closed_form(ops, rule, sign):
    gl, gg = _vectors(sign)
    cos = gl @ gg / (np.linalg.norm(gl) * np.linalg.norm(gg))
    assert np.sign(cos) == sign and abs(abs(cos) - 0.6) < 1e-9
    lam = 0.7
    t = lambda v: torch.tensor(v, dtype=torch.float32).reshape(1, 4, 8, 8)  # noqa: E731
    out = ops.fuse_gradients(t(gl), t(gg), lam, rule=rule)
    assert out.shape == (1, 4, 8, 8) and out.dtype == torch.float32
    expected = _fuse_closed_form(gl, gg, lam, rule)
    np.testing.assert_allclose(out.flatten().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    # the geometry of each rule (spec B4 analysis), u = g_l/|g_l|
    u = gl / np.linalg.norm(gl)
    along = out.flatten().double().numpy() @ u
    if rule == "clipdrag":
        # the scalar rule never shrinks the local step along u: it adds lam*sin*cos*|g_g| or lam*cos^2*|g_g|
        coef = math.sqrt(1 - cos * cos) if cos >= 0 else cos
        assert math.isclose(along, np.linalg.norm(gl) + lam * coef * cos * np.linalg.norm(gg), rel_tol=1e-5)
        assert along > np.linalg.norm(gl)
    elif sign > 0:
        assert math.isclose(along, np.linalg.norm(gl), rel_tol=1e-5)  # only the perpendicular part is added
    else:
        assert along < np.linalg.norm(gl)  # the opposing parallel part shrinks the local step


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("rule", ["clipdrag", "projection"])
def test_fusion_zero_norm_and_orthogonal_cases(ops, rule):
    gl, gg = _vectors(1)
    t = lambda v: torch.tensor(v, dtype=torch.float32).reshape(1, 4, 8, 8)  # noqa: E731
    zero = np.zeros_like(gl)
    # G_g = 0: the local gradient passes unchanged
    torch.testing.assert_close(ops.fuse_gradients(t(gl), t(zero), 0.7, rule=rule), t(gl))
    # G_l = 0: cos is defined as 0 (>= 0 branch): g_l + lam*g_g for both rules
    out = ops.fuse_gradients(t(zero), t(gg), 0.7, rule=rule)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, t(0.7 * gg))
    # exactly orthogonal: cos = 0, sin = 1, the perpendicular part is all of g_g
    e1, e2 = np.eye(256)[0] * 2.0, np.eye(256)[1] * 5.0
    torch.testing.assert_close(ops.fuse_gradients(t(e1), t(e2), 0.3, rule=rule), t(e1 + 0.3 * e2))
    # lam = 0: the local gradient alone
    torch.testing.assert_close(ops.fuse_gradients(t(gl), t(gg), 0.0, rule=rule), t(gl))


# ------------------------------------------------------------------------------------------------------------
# Fast point tracking (closer-only candidates)


def _feat_map(seed=0, C=2, H=16, W=16):
    return 5.0 + torch.rand(C, H, W, generator=torch.Generator().manual_seed(seed))  # every cell a poor match


@pytest.mark.parametrize("ops", OPS)
def test_tracking_ignores_a_better_match_farther_from_the_target(ops):
    feat = _feat_map()
    ref = torch.zeros(1, 2)
    feat[:, 8, 5] = 0.0  # perfect match, but farther from the target than the handle
    feat[:, 9, 10] = 0.5  # good match, closer to the target
    h, g = torch.tensor([[8.0, 8.0]]), torch.tensor([[8.0, 14.0]])
    free = ops.track(feat, ref, h, g, 3)  # plain DragDiffusion tracking takes the perfect match
    assert free.tolist() == [[8.0, 5.0]]
    fpt = ops.track(feat, ref, h, g, 3, closer_only=True)
    assert fpt.tolist() == [[9.0, 10.0]]
    assert _dist(fpt, g) < _dist(h, g)


@pytest.mark.parametrize("ops", OPS)
def test_tracking_handle_within_one_pixel_stays(ops):
    feat = _feat_map(1)
    ref = torch.zeros(2, 2)
    feat[:, 8, 9] = 0.0  # the target itself is a perfect match
    feat[:, 3, 4] = 0.0
    h = torch.tensor([[8.0, 8.0], [3.0, 3.0]])
    g = torch.tensor([[8.0, 9.0], [3.0, 3.0]])  # 1 px away; already there
    assert ops.track(feat, ref, h, g, 3, closer_only=True).tolist() == h.tolist()


@pytest.mark.parametrize("ops", OPS)
def test_tracking_without_candidates_keeps_the_handle(ops):
    """No window position is strictly closer to the target: the handle stays (not the window's top-left)."""
    feat = _feat_map(2)
    ref = torch.zeros(1, 2)
    feat[:, 0, 2] = 0.0  # perfect match at the clipped window's top-left
    h = torch.tensor([[0.0, 5.0]])
    g = torch.tensor([[-4.0, 5.0]])  # every closer position lies outside the map
    assert ops.track(feat, ref, h, g, 3).tolist() == [[0.0, 2.0]]
    assert ops.track(feat, ref, h, g, 3, closer_only=True).tolist() == [[0.0, 5.0]]
    # radius 0: the only candidate is the handle itself, which is never strictly closer
    assert ops.track(feat, ref, torch.tensor([[6.0, 6.0]]), torch.tensor([[12.0, 6.0]]), 0,
                     closer_only=True).tolist() == [[6.0, 6.0]]


def test_fpt_never_moves_a_handle_away_over_a_run(editor, image):
    pts = PTS + [((8, 120), (30, 100))]  # one near the border
    res = editor.edit(image, pts, prompt="a photo", method="clipdrag", **{**CD, "n_pix_step": 40})
    traj = res.trace["handles"]  # [steps+1, N, 2]
    assert traj.shape[0] >= 2 and torch.equal(traj, traj.round())
    targets = torch.tensor([[round(ty / 128 * 64), round(tx / 128 * 64)] for _, (tx, ty) in pts],
                           dtype=torch.float32)
    d = _dist(traj, targets[None])
    assert (d[1:] <= d[:-1]).all(), d
    # every tracking update of an unreached handle is strict progress (the current handle is no candidate)
    assert (d[1:] < d[:-1])[(d[:-1] ** 2 > 1)].all(), d
    # the run ends by the 2 px stop, not by the step budget
    assert res.trace["steps"] < 40 and (d[-1] < res.config.stop_distance).all(), (res.trace["steps"], d[-1])


# ------------------------------------------------------------------------------------------------------------
# The method: prompts, fallback, fusion wiring, API


def test_empty_prompts_fall_back_to_the_local_gradient(editor, image, local_only, monkeypatch):
    def no_clip(*a, **k):
        raise AssertionError("CLIP must not run when both prompts are empty")

    monkeypatch.setattr(clipdrag_mod.ClipObjective, "build", no_clip)
    monkeypatch.setattr(clipdrag_mod, "global_gradient", no_clip)
    monkeypatch.setattr(reference_ops, "fuse_gradients", no_clip)
    monkeypatch.setattr(fast_ops, "fuse_gradients", no_clip)
    with pytest.warns(UserWarning, match="both empty"):
        res = editor.edit(image, PTS, prompt="", method="clipdrag", edit_prompt="  ", **CD)
    assert res.image.size == (128, 128)
    assert res.trace["clip_used"] is False and res.trace["clip_loss"].numel() == 0
    assert res.trace["steps"] == CD["n_pix_step"]
    zt = _prep(editor).zt
    assert (res.trace["z_dragged"] - zt).abs().max() > 0  # it still drags
    # ... exactly as the fused rule with lam = 0 (G = G_l) does
    torch.testing.assert_close(res.trace["z_dragged"], local_only, rtol=0, atol=1e-6)


def test_edit_prompt_drives_clip_and_the_unet_keeps_the_source_prompt(editor, image, tiny_model, monkeypatch):
    built, calls = [], []
    real_build, real_fuse = clipdrag_mod.ClipObjective.build, reference_ops.fuse_gradients

    def spy_build(*a, **k):
        obj = real_build(*a, **k)
        built.append((a, k, obj))
        return obj

    def spy_fuse(gl, gg, lam, *, rule="clipdrag"):
        calls.append((gl.clone(), gg.clone(), lam, rule))
        return real_fuse(gl, gg, lam, rule=rule)

    loop_kwargs = {}
    real_drag = clipdrag_mod.drag_at_edit_timestep

    def spy_drag(ctx, **kw):
        loop_kwargs.update(kw)
        return real_drag(ctx, **kw)

    monkeypatch.setattr(clipdrag_mod.ClipObjective, "build", staticmethod(spy_build))
    monkeypatch.setattr(reference_ops, "fuse_gradients", spy_fuse)
    monkeypatch.setattr(clipdrag_mod, "drag_at_edit_timestep", spy_drag)
    res = editor.edit(image, PTS, prompt="a photo", method="clipdrag", preset="bench", edit_prompt="a red ball",
                      **CD)
    # the DragDiffusion loop with GoodDrag-style supervision (F0 at the initial handle, step min(4, d)) and FPT
    assert {k: loop_kwargs[k] for k in ("n_steps", "r_m", "r_p", "ms_reference", "step_cap", "closer_only")} == \
        dict(n_steps=3, r_m=4, r_p=12, ms_reference="initial", step_cap=4.0, closer_only=True)
    assert loop_kwargs.get("ms_weight") is None  # (2 r_m + 1)^2, spec B3
    assert len(built) == 1 and built[0][0][1] == "a red ball" and res.trace["clip_prompt"] == "a red ball"
    assert built[0][1]["coef"] == 300.0
    assert len(calls) == res.trace["steps"] == res.trace["clip_loss"].numel()  # CLIP at every iteration
    assert all(lam == 0.3 and rule == "clipdrag" for *_, lam, rule in calls)  # the bench lambda
    # the UNet conditioning is the source prompt: in the drag/denoise branch and inside G_g
    c_src = tiny_model.encode_prompt("a photo")
    torch.testing.assert_close(res.trace["c_edit"], c_src)
    prep = _prep(editor)
    g_expect, _ = clip_mod.global_gradient(tiny_model, prep.schedule, prep.zt, prep.schedule.t_edit, c_src,
                                           built[0][2])
    torch.testing.assert_close(calls[0][1], g_expect)  # step 0: G_g of the inverted latent at t_edit
    # the traced cosine is the one between the two gradients handed to the fusion
    gl, gg = calls[0][0].flatten(), calls[0][1].flatten()
    torch.testing.assert_close(res.trace["clip_cos"][0], gl.dot(gg) / (gl.norm() * gg.norm()))
    # empty edit prompt: CLIP follows the source prompt
    res2 = editor.edit(image, PTS, prompt="a photo", method="clipdrag", **{**CD, "n_pix_step": 1})
    assert res2.trace["clip_prompt"] == "a photo" and built[-1][0][1] == "a photo"


def test_fusion_modes_change_the_dragged_latent(editor, image, local_only):
    out = {"local": local_only}
    for name, kw in {"clipdrag": dict(), "projection": dict(fusion="projection")}.items():
        res = editor.edit(image, PTS, prompt="", method="clipdrag", edit_prompt="a red ball", **CD, **kw)
        assert torch.isfinite(res.trace["clip_loss"]).all() and (res.trace["g_global_norm"] > 0).all()
        assert res.trace["fusion"] == res.config.fusion
        out[name] = res.trace["z_dragged"]
    # the global gradient changes the dragged latent, and the two fusion rules differ
    assert (out["clipdrag"] - out["local"]).abs().max() > 1e-6
    assert (out["projection"] - out["clipdrag"]).abs().max() > 1e-6


def test_api_edit_returns_an_image_of_the_input_size(tiny_model):
    img = smooth_image(128, 160, seed=5)
    res = fastdrag.edit(img, PTS, prompt="a photo", method="clipdrag", model=tiny_model, edit_prompt="a red ball",
                        fusion="projection", **{**CD, "n_pix_step": 2})
    assert res.image.size == (160, 128) and res.method == "clipdrag" and len(res.points) == 2
    assert res.trace["clip_used"] is True and res.trace["steps"] == 2
    assert set(res.timings) >= {"lora", "invert", "drag", "denoise", "decode", "total"}
