"""Issue 16: every stage at its FLOP floor.

1. The three savings on the tiny model, fp32: the truncated UNet pass (features and latent gradient bit for bit
   those of the full pass, eager and compiled), and whole edits with every saving against the same edits with each
   reverted (results bit for bit, fewer UNet passes and VAE encodes counted).
2. The guard: counted FLOPs of one drag step of every method, with and without a mask, and of one LoRA step, on the
   SD-1.5 architecture built on the meta device, against the analytic floor (benchmarks/flops.py).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import fastdrag
import fastdrag.pipeline as pipeline
import fastdrag.unet as fd_unet
from fastdrag.methods import dragdiffusion as dd
from fastdrag.unet import UNetFeatures, truncated_features

from .conftest import smooth_image

# ----------------------------------------------------------------------------------------------------------
# 1a. the truncated pass


@pytest.mark.parametrize("hw", [(16, 16), (12, 9)])  # 12x9: a latent the up-samplers need upsample_size for
def test_truncated_pass_equals_the_full_pass_bit_for_bit(tiny_model, hw):
    c = tiny_model.encode_prompt("a photo")
    z = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(1))
    for idx in range(5):  # mid block and every up block
        uf = UNetFeatures(tiny_model.unet, idx)
        try:
            assert uf.truncates
            z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
            eps, f_full = uf(z1, 681, c)
            none, f_cut = uf(z2, 681, c, with_eps=False)
            assert none is None and eps is not None
            assert torch.equal(f_full, f_cut), idx
            w = torch.randn(f_full.shape, generator=torch.Generator().manual_seed(2))
            (g_full,) = torch.autograd.grad((f_full * w).sum(), z1)
            (g_cut,) = torch.autograd.grad((f_cut * w).sum(), z2)
            assert torch.equal(g_full, g_cut), idx
        finally:
            uf.close()


def test_truncated_pass_compiles_as_one_graph(tiny_model):
    """fullgraph capture of the truncated pass (no graph break), equal to the eager pass; the full pass is a second
    graph of the same compiled wrapper, not a recompile of the first."""
    from torch._dynamo.utils import counters

    from fastdrag.compile import compile_unet_features

    torch._dynamo.reset()
    counters.clear()
    c = tiny_model.encode_prompt("a photo")
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    comp = compile_unet_features(UNetFeatures(tiny_model.unet, 3), backend="eager")
    eager = UNetFeatures(tiny_model.unet, 3)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                none, feat = comp(z, 681, c, with_eps=False)
        assert none is None and counters["stats"]["unique_graphs"] == 1
        assert torch.equal(feat, eager(z, 681, c, with_eps=False)[1])
        eps, feat_full = comp(z, 681, c)
        assert counters["stats"]["unique_graphs"] == 2 and torch.equal(feat_full, feat)
    finally:
        comp.close()
        eager.close()
        torch._dynamo.reset()


def test_truncated_features_stop_after_the_feature_block(tiny_model):
    """The blocks above the feature block and conv_out never run in the truncated pass."""
    unet = tiny_model.unet
    ran = []
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: ran.append(name))
             for name, m in (("up3", unet.up_blocks[3]), ("conv_out", unet.conv_out), ("up2", unet.up_blocks[2]))]
    try:
        with torch.no_grad():
            truncated_features(unet, torch.randn(1, 4, 16, 16), 681, tiny_model.encode_prompt(""), 3)
    finally:
        for h in hooks:
            h.remove()
    assert ran == ["up2"]


# ----------------------------------------------------------------------------------------------------------
# 1b. whole edits: each saving against its revert


def _old_cached_reference(ctx, t, need_x_prev):
    """The reference pass before issue 16: its own no-grad full forward of the un-optimized latent, cached."""
    key = dd._ref_key(ctx, t)
    ref = ctx.prep.extras.get(key)
    if ref is None or ref[1] is None:
        with torch.no_grad():
            eps, feat = ctx.unet_features(ctx.prep.zt, t, ctx.prep.text_emb)
            ref = ctx.prep.extras[key] = (feat, ctx.prep.schedule.step(eps, t, ctx.prep.zt))
    return ref


def revert(monkeypatch, which: str):
    """Undo one saving: 'truncate' (the full UNet pass always), 'encode' (prepare() encodes the image again),
    'reference' (a separate reference forward before the loop)."""
    if which == "truncate":
        monkeypatch.setattr(fd_unet, "can_truncate", lambda unet: False)
    elif which == "encode":
        real = pipeline.lora_mod.fit_lora

        def fit_lora(*a, encoded=None, **k):
            return real(*a, **k)

        monkeypatch.setattr(pipeline.lora_mod, "fit_lora", fit_lora)
    elif which == "reference":
        monkeypatch.setattr(dd, "cached_reference", _old_cached_reference)
    else:
        raise ValueError(which)


class PassCounter:
    """Counts full UNet forwards, truncated passes and VAE encodes."""

    def __init__(self, monkeypatch, model):
        self.full = self.cut = self.encodes = 0
        unet_cls, vae = type(model.unet), model.vae
        real_fwd, real_cut, real_enc = unet_cls.forward, fd_unet.truncated_features, vae.encode
        me = self

        def forward(*a, **k):
            me.full += 1
            return real_fwd(*a, **k)

        def cut(*a, **k):
            me.cut += 1
            return real_cut(*a, **k)

        def encode(*a, **k):
            me.encodes += 1
            return real_enc(*a, **k)

        monkeypatch.setattr(unet_cls, "forward", forward)
        monkeypatch.setattr(fd_unet, "truncated_features", cut)
        monkeypatch.setattr(vae, "encode", encode)

    def take(self):
        out = (self.full, self.cut, self.encodes)
        self.full = self.cut = self.encodes = 0
        return out


KW = dict(lora_steps=2, n_inference_step=10, n_pix_step=5)
POINTS = [((40, 60), (70, 74))]


def _mask():
    m = np.zeros((128, 128), dtype=np.uint8)
    m[20:100, 20:110] = 1
    return m


def _edits(model, monkeypatch, method, mask, reverts=()):
    """A first edit and a re-drag of the same prepared image (other points), with the passes each counted."""
    with monkeypatch.context() as mp:
        for which in reverts:
            revert(mp, which)
        counter = PassCounter(mp, model)
        ed = fastdrag.Editor(model)
        first = ed.edit(smooth_image(), POINTS, mask=mask, method=method, backend="reference", **KW)
        n_first = counter.take()
        again = ed.edit(smooth_image(), [((50, 50), (60, 80))], mask=mask, method=method, backend="reference", **KW)
        n_again = counter.take()
    return (first, n_first), (again, n_again)


def _same(a, b):
    assert torch.equal(a.trace["z_dragged"], b.trace["z_dragged"])
    assert torch.equal(a.trace["handles"], b.trace["handles"])
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


@pytest.mark.parametrize("method,masked", [("dragdiffusion", False), ("dragdiffusion", True), ("dragtext", False)])
def test_savings_leave_edits_unchanged_and_cut_the_passes(tiny_model, monkeypatch, method, masked):
    """Against each saving reverted, and all three at once: the same latents, trajectories and images, first drag and
    re-drag, and the counted passes drop by what the saving removes."""
    mask = _mask() if masked else None
    new = _edits(tiny_model, monkeypatch, method, mask)
    (first, (full, cut, enc)), (again, (full2, cut2, enc2)) = new
    iters, iters2 = len(first.trace["handles"]), len(again.trace["handles"])
    sched = pipeline.Schedule.make(tiny_model.scheduler, KW["n_inference_step"], first.config.inversion_strength)
    n_inv, n_den = len(sched.inversion_timesteps), len(sched.denoise_timesteps)
    lora = KW["lora_steps"]
    assert enc == 1 and enc2 == 0  # the 128x128 image is the tiny model's native size: one encode per image
    assert cut == (0 if masked else iters) and cut2 == (0 if masked else iters2)
    assert full == lora + n_inv + (iters if masked else 0) + n_den  # no reference pass
    assert full2 == (iters2 if masked else 0) + n_den
    old = {}
    for which in ("truncate", "encode", "reference"):
        old[which] = _edits(tiny_model, monkeypatch, method, mask, reverts=(which,))
    old["all"] = _edits(tiny_model, monkeypatch, method, mask, reverts=("truncate", "encode", "reference"))
    for which, ((f, nf), (a, na)) in old.items():
        _same(f, first)
        _same(a, again)
    assert old["encode"][0][1][2] == 2  # reverted: the LoRA fit's encode, then prepare()'s own
    assert old["reference"][0][1][:2] == (full + 1, cut)  # reverted: one more (full) forward on a first drag
    assert old["reference"][1][1][:2] == (full2, cut2)  # a re-drag reads the cached reference either way
    if not masked:
        assert old["truncate"][0][1][:2] == (full + cut, 0)  # reverted: every truncated pass is a full one


# ----------------------------------------------------------------------------------------------------------
# 2. the guard: counted FLOPs on the meta SD-1.5 at 512x512 against the analytic floor

from benchmarks import flops as bf  # noqa: E402

LAT = 64  # 512x512 image


def check_drag_step(method: str, masked: bool):
    """One drag step of `method`, counted, against its floor; no weight gradient anywhere in the drag stage."""
    rep = bf.count_method(method, masked, steps=1, denoise=False)
    floor = bf.drag_step_flops(bf.SD15, LAT, LAT, masked=masked)
    if method == "gooddrag":  # its unedited trajectory: one full forward per drag timestep (here one)
        floor += 2 * bf.unet_forward_macs(bf.SD15, LAT, LAT)["total"]
    assert rep.params_with_grad["drag"] == set(), "a UNet parameter requires grad in the drag loop"
    assert rep.conv_masks["drag"] == {(True, False, False)}, rep.conv_masks["drag"]  # input gradients only
    drag = rep.flops["all"] - rep.flops["denoise"]  # the drag stage and anything outside the stages
    assert abs(drag / floor - 1) < 0.01, (method, masked, drag / 1e12, floor / 1e12)
    return rep


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_drag_step_counts_its_floor(method, masked):
    check_drag_step(method, masked)


def test_no_mask_drag_step_counts_1_27_tflop():
    """The truncated pass: 1.27 TFLOP a step at 512x512 (the full pass: 1.46)."""
    assert round(bf.drag_step_flops(bf.SD15, LAT, LAT) / 1e12, 2) == 1.27
    full = 2 * sum(bf.unet_forward_macs(bf.SD15, LAT, LAT, stop=3)[k] for k in ("grad",)) + \
        2 * bf.unet_forward_macs(bf.SD15, LAT, LAT)["total"]
    assert round(full / 1e12, 2) == 1.46


def check_prepare():
    """prepare() of a native-size (512x512) image with one LoRA step and one inversion step: the image is encoded
    once (inside the LoRA fit), so the inversion stage is exactly its one UNet forward."""
    rep = bf.count_prepare(lora_steps=1, n_inference_step=2)
    floor = 2 * bf.unet_forward_macs(bf.SD15, LAT, LAT)["total"]
    assert abs(rep.flops["invert"] / floor - 1) < 0.01, (rep.flops["invert"] / 1e12, floor / 1e12)
    return rep


def test_prepare_encodes_a_native_size_image_once():
    check_prepare()


@pytest.mark.parametrize("which", ["truncate", "reference", "encode"])
def test_the_guard_fails_when_a_saving_is_reverted(monkeypatch, which):
    """Each saving reverted in place (the helpers of part 1), the guard's check fails."""
    revert(monkeypatch, which)
    with pytest.raises(AssertionError):
        if which == "encode":
            check_prepare()
        else:
            check_drag_step("dragdiffusion", masked=False)
