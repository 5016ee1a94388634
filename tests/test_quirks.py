"""quirks="official" (issue 17): the released code's result-moving quirks, reproduced where each mechanism lives,
and absent with the default quirks="fixed" (docs/deviations.md says which entry is which). Each test is a small
hand-worked case on the tiny model or on the function that holds the quirk."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastdrag
from fastdrag import ConfigError, pipeline
from fastdrag import clip as clip_mod
from fastdrag.config import CONFIGS, QUIRKS
from fastdrag.ddim import Schedule
from fastdrag.methods import clipdrag as clipdrag_mod
from fastdrag.methods import dragdiffusion as dd
from fastdrag.methods import gooddrag as gd

PROMPT = "a red disc"
PTS = [((40, 60), (72, 60))]
PTS2 = [((40, 60), (72, 60)), ((90, 30), (90, 70))]  # two handles, both active for the steps below
DT = dict(method="dragtext", prompt=PROMPT, lora_steps=0, n_pix_step=3, inversion_strength=0.16)
GD = dict(method="gooddrag", prompt=PROMPT, lora_steps=0, inversion_strength=0.16, drag_end_step=1, track_per_step=3,
          max_drag_per_track=1, max_track_no_change=100)
CD = dict(method="clipdrag", lora_steps=0, n_inference_step=5, inversion_strength=0.6, n_pix_step=3, clip_model="tiny")
FROZEN = dict(latent_lr=1e-30, text_lr=1e-30)  # z and c_hat stay bit for bit: every forward is the first one


def record_steps(monkeypatch):
    """Record (which leaf, its value before the step, the gradient handed to its Adam) at every masked_step of the
    latent loops (z: dragdiffusion.py / gooddrag.py) and of the text leaf (c_hat: pipeline.TextLeaf)."""
    steps = []
    for owner in (dd, gd, pipeline):
        real = owner.masked_step

        def spy(opt, leaf, grad, done=None, _real=real):
            steps.append(("c" if leaf.shape[1] == 77 else "z", leaf.detach().clone(), grad.detach().clone()))
            return _real(opt, leaf, grad, done)

        monkeypatch.setattr(owner, "masked_step", spy)
    return steps


def by_leaf(steps, name):
    return [(v, g) for n, v, g in steps if n == name]


# ------------------------------------------------------------------------------------------------------------
# The switch


def test_quirks_switch_default_presets_and_validation():
    for method in CONFIGS:
        assert fastdrag.make_config(method).quirks == "fixed"
        assert fastdrag.make_config(method, preset="ui").quirks == "fixed"
        assert fastdrag.make_config(method, preset="bench").quirks == "official"  # the preset that reproduces numbers
        assert fastdrag.make_config(method, preset="bench", quirks="fixed").quirks == "fixed"  # overrides win
    assert QUIRKS == ("fixed", "official")
    with pytest.raises(ConfigError, match=r"quirks must be one of \('fixed', 'official'\).*'faithful'"):
        fastdrag.make_config("dragtext", quirks="faithful")
    with pytest.raises(ConfigError, match="quirks must be a string"):
        fastdrag.make_config("gooddrag", quirks=None)


def test_bench_preset_runs_the_edit_in_official_mode(editor, img, monkeypatch):
    seen = []
    real = gd.drag_phase
    monkeypatch.setattr(gd, "drag_phase", lambda ctx, *a, **k: seen.append(ctx.cfg.quirks) or real(ctx, *a, **k))
    res = editor.edit(img, PTS, preset="bench", **{**GD, "max_track_no_change": 5})
    assert res.config.quirks == "official" and seen == ["official"]


# ------------------------------------------------------------------------------------------------------------
# DragText on DragDiffusion (DragText/DragDiffusion/utils/drag_utils.py L161-183)


def test_dragtext_latent_step_k_adds_step_k_minus_1_motion_gradient(editor, img, monkeypatch):
    """z and c_hat frozen (lr 1e-30), no mask: every forward is the first, so each step's fresh latent gradient is
    the same g0 = d L_ms / dz. Fixed: z's Adam gets g0 at every step. Official: the text backward of step k-1 left
    d L_ms / dz in z.grad, so step k gets g0 + g0 = 2 g0 from step 1 on (step 0 has nothing stale)."""
    steps = record_steps(monkeypatch)
    runs = {}
    for quirks in QUIRKS:
        steps.clear()
        res = editor.edit(img, PTS, quirks=quirks, **DT, **FROZEN)
        assert res.trace["steps"] == 3
        runs[quirks] = by_leaf(steps, "z")
    fixed, official = runs["fixed"], runs["official"]
    z0, g0 = fixed[0]
    assert g0.abs().max() > 0
    for k in range(3):
        assert torch.equal(fixed[k][0], z0) and torch.equal(official[k][0], z0)  # the frozen latent
        torch.testing.assert_close(fixed[k][1], g0, rtol=0, atol=0)
        torch.testing.assert_close(official[k][1], g0 if k == 0 else 2 * g0, rtol=0, atol=0)


def test_dragtext_latent_loss_reaches_c_hat(editor, img, monkeypatch):
    """Same frozen case, c_hat = c so the regularization's gradient is 0: fixed, c_hat's gradient is d L_ms / dc_hat;
    official, the latent loss's backward (here L_ms, no mask) accumulates into c_hat.grad first, giving twice it."""
    steps = record_steps(monkeypatch)
    runs = {}
    for quirks in QUIRKS:
        steps.clear()
        editor.edit(img, PTS, quirks=quirks, **DT, **FROZEN)
        runs[quirks] = by_leaf(steps, "c")
    assert len(runs["fixed"]) == len(runs["official"]) == 3
    for (_, gf), (_, go) in zip(runs["fixed"], runs["official"]):
        assert gf.abs().max() > 0
        torch.testing.assert_close(go, 2 * gf, rtol=0, atol=0)


def test_dragtext_regularization_counts_once_per_active_handle(editor, img, tiny_model, monkeypatch):
    """Two active handles, text_lam = 10, so on the prompt tokens c_hat's gradient is dominated by the
    regularization's, text_lam * n * sign(c_hat - c): n = 1 fixed, n = 2 official (added inside the per-handle
    loop). Steps 1 and 2 (at step 0, c_hat = c and the sign is 0)."""
    steps = record_steps(monkeypatch)
    c, pad, lam = tiny_model.encode_prompt(PROMPT), tiny_model.pad_idx(PROMPT), 10.0
    for quirks, n in (("fixed", 1.0), ("official", 2.0)):
        steps.clear()
        res = editor.edit(img, PTS2, quirks=quirks, text_lam=lam, **DT)
        assert res.trace["steps"] == 3
        targets = torch.tensor([[30.0, 36.0], [35.0, 45.0]])  # PTS2's targets on the 64x64 supervision grid
        assert ((targets - res.trace["handles"]).norm(dim=-1) >= 2).all()  # both handles active at every step
        for value, grad in by_leaf(steps, "c")[1:]:
            sign = torch.sign(value - c)[:, :pad]
            assert (sign != 0).all()
            torch.testing.assert_close(grad[:, :pad] / (lam * sign), torch.full_like(sign, n), rtol=0, atol=2e-3)


def test_dragtext_official_without_a_mask_adds_no_mask_term(editor, img, monkeypatch):
    """The DragDiffusion port keeps `if using_mask` (L169) in both modes: no mask term without a mask."""
    seen = []
    real = dd.mask_term
    monkeypatch.setattr(dd, "mask_term", lambda *a, **k: seen.append(k.get("always")) or real(*a, **k))
    editor.edit(img, PTS, quirks="official", **DT)
    assert seen == [False] * 3


# ------------------------------------------------------------------------------------------------------------
# GoodDrag and its DragText port (zewei-Zhang/GoodDrag pipeline.py; DragText GoodDrag/pipeline.py)


def test_gooddrag_text_port_latent_loss_reaches_c_hat_and_z_gets_nothing_stale(editor, img, monkeypatch):
    """Frozen z and c_hat, lam = 0: c_hat's gradient is twice d L_ms / dc_hat in official mode (latent loss, then
    text loss, backpropagated into one c_hat.grad), once in fixed mode; z's gradient is the same in both (the
    port zeroes both grads at the top of each iteration)."""
    steps = record_steps(monkeypatch)
    runs = {}
    for quirks in QUIRKS:
        steps.clear()
        res = editor.edit(img, PTS, quirks=quirks, optimize_text=True, lam=0.0, **GD, **FROZEN)
        assert res.trace["steps"] == 3
        runs[quirks] = steps[:]
    f, o = runs["fixed"], runs["official"]
    assert [n for n, *_ in f] == [n for n, *_ in o] == ["c", "z"] * 3
    for (_, _, gf), (_, _, go) in zip(by_leaf_all(f, "z"), by_leaf_all(o, "z")):
        torch.testing.assert_close(go, gf, rtol=0, atol=0)
    for (_, _, gf), (_, _, go) in zip(by_leaf_all(f, "c"), by_leaf_all(o, "c")):
        assert gf.abs().max() > 0
        torch.testing.assert_close(go, 2 * gf, rtol=0, atol=0)


def by_leaf_all(steps, name):
    return [s for s in steps if s[0] == name]


def test_gooddrag_mask_term_without_a_mask(editor, img, monkeypatch):
    """Official GoodDrag adds lam * sum |z_{t-1} - z0_{t-1}| * (1 - M) always, and an undrawn mask is all zeros:
    with mask=None, official mode adds sum |z_{t-1} - z0_{t-1}| over the whole latent (hand-computed below from the
    term's own inputs); fixed mode adds nothing."""
    calls = []
    real = gd.mask_term

    def spy(schedule, eps, t, z, x_prev0, mask, **kw):
        out = real(schedule, eps, t, z, x_prev0, mask, **kw)
        # eps is None where no term is computed (fixed mode, no mask: the pass stops after the feature block)
        diff = None if eps is None else schedule.step(eps.detach().float(), t, z.detach()) - x_prev0
        calls.append((diff, mask, out))
        return out

    monkeypatch.setattr(gd, "mask_term", spy)
    runs = {}
    for quirks in QUIRKS:
        calls.clear()
        runs[quirks] = editor.edit(img, PTS, quirks=quirks, **GD)
        assert len(calls) == 3 and all(m is None for _, m, _ in calls)
        if quirks == "fixed":
            assert all(out == 0.0 for *_, out in calls)
        else:
            for diff, _, out in calls:
                torch.testing.assert_close(out.detach(), diff.abs().sum())
            assert float(calls[-1][2].detach()) > 1e-3  # live once z has moved
    assert not np.array_equal(np.asarray(runs["fixed"].image), np.asarray(runs["official"].image))


# ------------------------------------------------------------------------------------------------------------
# CLIPDrag (HKUST-LongGroup/CLIPDrag utils/drag_utils.py, ui_utils.py; bench drag_diffusion_update_final)


@pytest.fixture(scope="module")
def clip_objectives():
    kw = dict(device="cpu", dtype=torch.float32, coef=300.0)
    return {q: clip_mod.ClipObjective.build("tiny", "a red ball", official=q == "official", **kw) for q in QUIRKS}


def test_clip_input_is_mapped_to_half_one_in_official_mode(clip_objectives):
    """A decoded image in [0, 1] (black and white halves): fixed, CLIP's pixels (before mean/std) are [0, 1];
    official, the second (x + 1) / 2 lands them in [0.5, 1]."""
    x = torch.zeros(1, 3, 224, 224)
    x[..., 112:] = 1.0
    mean = torch.tensor(clip_mod.CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(clip_mod.CLIP_STD)[None, :, None, None]
    for quirks, (lo, hi) in (("fixed", (0.0, 1.0)), ("official", (0.5, 1.0))):
        pix = clip_objectives[quirks].preprocess(x) * std + mean
        torch.testing.assert_close(pix[..., :112], torch.full_like(pix[..., :112], lo))
        torch.testing.assert_close(pix[..., 112:], torch.full_like(pix[..., 112:], hi))


def test_x0_is_rounded_to_fp16_before_decoding_in_official_mode(tiny_model, clip_objectives, monkeypatch):
    """The decoder's input is (1/0.18215) * x0.half() (fp16 values) in official mode, x0 / 0.18215 in fixed mode."""
    sched = Schedule.make(tiny_model.scheduler, 50, 0.7)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    c = tiny_model.encode_prompt("a photo")
    with torch.no_grad():
        eps = tiny_model.unet(z, sched.t_edit, encoder_hidden_states=c, return_dict=False)[0]
        x0 = sched.pred_x0(eps.float(), sched.t_edit, z)
    seen = []
    real = tiny_model.vae.decode
    monkeypatch.setattr(tiny_model.vae, "decode", lambda x, **k: seen.append(x.detach().clone()) or real(x, **k))
    for quirks in QUIRKS:
        clip_mod.global_gradient(tiny_model, sched, z, sched.t_edit, c, clip_objectives[quirks])
    fixed, official = seen
    torch.testing.assert_close(fixed, x0 / tiny_model.scaling_factor, rtol=0, atol=0)
    torch.testing.assert_close(official, ((1 / tiny_model.scaling_factor) * x0.half()).float(), rtol=0, atol=0)
    assert torch.equal(official.half().float(), official)  # fp16 values
    assert not torch.equal(fixed.half().float(), fixed) and not torch.equal(fixed, official)


def _ctx(quirks, edit_prompt, prompt):
    return SimpleNamespace(cfg=fastdrag.make_config("clipdrag", quirks=quirks, edit_prompt=edit_prompt),
                           req=SimpleNamespace(prompt=prompt))


def test_prompt_emptiness_test():
    """Official (ui_utils.py L220): the edit prompt is used unless it is exactly "", so " " is CLIP's text; fixed:
    a whitespace-only edit prompt falls back to the source prompt."""
    assert clipdrag_mod.clip_prompt(_ctx("fixed", "  ", "a photo")) == "a photo"
    assert clipdrag_mod.clip_prompt(_ctx("official", "  ", "a photo")) == "  "
    for quirks in QUIRKS:
        assert clipdrag_mod.clip_prompt(_ctx(quirks, "", "a photo")) == "a photo"
        assert clipdrag_mod.clip_prompt(_ctx(quirks, "a cat", "a photo")) == "a cat"


def test_clipdrag_runs_clip_on_any_prompt_and_adds_the_mask_term_in_official_mode(editor, img, monkeypatch):
    """Official mode follows the bench loop: CLIP runs on the prompt it has, a whitespace-only one included (fixed:
    warn and drag with G_l alone), and the mask term is added with mask=None, M = 0 (fixed: not added)."""
    always = []
    real = dd.mask_term
    monkeypatch.setattr(dd, "mask_term", lambda *a, **k: always.append(k.get("always")) or real(*a, **k))
    with pytest.warns(UserWarning, match="both empty"):
        fixed = editor.edit(img, PTS, prompt="", edit_prompt=" ", quirks="fixed", **CD)
    assert fixed.trace["clip_used"] is False and always == [False] * 3
    always.clear()
    official = editor.edit(img, PTS, prompt="", edit_prompt=" ", quirks="official", **CD)
    assert official.trace["clip_used"] is True and official.trace["clip_prompt"] == " "
    assert official.trace["clip_loss"].numel() == 3 and always == [True] * 3


def test_cli_quirks_flag(tmp_path, img, capsys):
    from PIL import Image

    from fastdrag import cli

    src = tmp_path / "in.png"
    Image.fromarray(img).save(src)
    rc = cli.main(["edit", "--model", "tiny", "--image", str(src), "--drag", "40,60:72,60", "--out",
                   str(tmp_path / "out.png"), "--quirks", "faithful"])
    assert rc == 2 and "quirks must be one of ('fixed', 'official')" in capsys.readouterr().err
